"""Does FSQ rounding cost the spectrum tokenizer its emission lines? Two checks on held-out mock spectra.

1. Decode a trained tokenizer's latents with and without rounding (same weights).
2. ``--train-recipe``: first train the recipe with rounding switched off (the quantizer's bounded
   latents go to the decoder unrounded), then run check 1 on that model's unrounded decode.

For each decode it prints median and pooled R^2 against the noiseless truth and the median
decoded / true flux of H-alpha and [OII], overall and per truth line S/N bin, so that weak-line
shrinkage (low S/N only) can be told from lines not learned (every S/N).

    python benchmarks/spectrum_rounding.py --tokenizer runs/tokenizers/spectrum_cpu/tokenizer --data runs/mock_eval
    python benchmarks/spectrum_rounding.py --train-recipe R.yaml --train-data runs/mock20k --out runs/unrounded \\
        --data runs/mock_eval
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

SNR_BINS = ((5, 10), (10, 20), (20, 50), (50, np.inf))


def train_unrounded(recipe: str, data: str, out: str) -> Path:
    """Train ``recipe`` with FSQ rounding replaced by the identity (straight bounded latents)."""
    from aion.tokenizers import quantizers
    from aion.tokenizers.spectrum import train_spectrum_tokenizer

    rounded = quantizers.FSQ.quantize

    def unrounded(self: quantizers.FSQ, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, indices = rounded(self, x)
        return self._bound(x.float()) / torch.div(self._levels, 2, rounding_mode="floor"), indices

    quantizers.FSQ.quantize = unrounded
    try:
        train_spectrum_tokenizer(recipe, data, out)
    finally:
        quantizers.FSQ.quantize = rounded
    return Path(out) / "tokenizer"


def check(tokenizer_dir: Path, data: str, max_spectra: int | None) -> dict[str, dict]:
    from aion.mock.spectra import desi_wavelength
    from aion.tokenizers import load_tokenizer
    from aion.tokenizers.quantizers import FSQ
    from aion.tokenizers.spectrum import LINES_FOR_EVAL, line_fluxes, load_mock_desi_with_truth, r2_scores

    tok = load_tokenizer(tokenizer_dir)
    if not isinstance(tok.model.quantizer, FSQ):
        raise SystemExit(f"{tokenizer_dir}: this check is for FSQ tokenizers")
    obs, sub, truth = load_mock_desi_with_truth(data, max_spectra)
    wave, grid = desi_wavelength(), tok.wavelength
    present = obs.present
    prep = tok.prepare(obs)
    model = tok.model.eval()
    fsq = model.quantizer
    amp = tok.amplitude_value(prep["amp_index"].numpy())[:, None]
    with torch.no_grad():
        latent = model.encode_latent(model.network_input(prep["flux"], prep["ivar"], prep["valid"]))
        codes = {"rounded": fsq.quantize(latent)[0],
                 "unrounded": fsq._bound(latent) / torch.div(fsq._levels, 2, rounding_mode="floor")}
        decoded = {k: model.decode_codes(c).double().numpy() * amp for k, c in codes.items()}
    t, ov = truth[present], obs.valid[present]
    oi = np.where(ov, obs.ivar[present].astype(np.float64), np.inf)
    z = np.asarray(sub["Z"], dtype=np.float64)[present]
    out: dict[str, dict] = {}
    for name, dec in decoded.items():
        d = np.stack([np.interp(wave, grid, row) for row in dec])[present]
        r2, pooled = r2_scores(d, t)
        res: dict = {"r2_median": float(np.median(r2)), "r2_pooled": pooled}
        for line, rest in LINES_FOR_EVAL.items():
            f_true, sig = line_fluxes(wave, t, ov, z, rest, ivar=oi)
            f_dec, _ = line_fluxes(wave, d, ov, z, rest)
            snr = np.where(np.isfinite(sig) & (sig > 0), f_true / sig, np.nan)
            entry = {}
            for lo, hi in ((5, np.inf), *SNR_BINS):
                sel = np.isfinite(snr) & (snr > lo) & (snr <= hi)
                if sel.any():
                    ratio = float(np.median(f_dec[sel] / f_true[sel]))
                    entry[f"snr_{lo}-{hi}"] = {"n": int(sel.sum()), "ratio_median": ratio}
            res[line] = entry
        out[name] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", help="a trained spectrum tokenizer directory (check 1)")
    ap.add_argument("--train-recipe", help="train this recipe with rounding off first (check 2)")
    ap.add_argument("--train-data", help="training data for --train-recipe")
    ap.add_argument("--out", help="output directory for --train-recipe")
    ap.add_argument("--data", required=True, help="held-out mock universe")
    ap.add_argument("--max-spectra", type=int, default=None)
    args = ap.parse_args()
    if args.train_recipe:
        if not (args.train_data and args.out):
            ap.error("--train-recipe needs --train-data and --out")
        tokenizer = train_unrounded(args.train_recipe, args.train_data, args.out)
    elif args.tokenizer:
        tokenizer = Path(args.tokenizer)
    else:
        ap.error("give --tokenizer or --train-recipe")
    print(json.dumps(check(tokenizer, args.data, args.max_spectra), indent=2))


if __name__ == "__main__":
    main()
