"""Streaming alignment metrics between predicted and target hidden states (DESIGN.md §4.3, reference §9).

:class:`MetricAccumulator` consumes padded batches ``pred [B, S, D]``, ``target [B, S, D]``,
``mask [B, S]`` (+ optional target token ids) and keeps only counts, sums, per-position sums,
fixed-size histograms and one scalar list per pair, so memory is bounded by one batch no matter how
large the store is. Every metric has an explicit name; in particular (reference §12.2 P1.5):

- ``cos_pooled``     mean cosine over all valid positions (what L1-L5 reported upstream);
- ``cos_pair_mean``  mean over pairs of the per-pair mean cosine (what L6 reported upstream).

Acceptance lengths (expected accepted draft tokens per speculative round for a draft window γ):

- ``acc_len_sim_<basis>``       SpecForge ``simulated_acc_len``: Σ_{k=1..γ} Π_{j<k} p_j with p_j the
  per-position acceptance rate at position j (over the pairs still valid at j);
- ``acc_len_empirical_<basis>`` mean over pairs of min(γ, leading run of accepts from position 0);
- ``acc_len_rounds_<basis>``    simulated SD rounds over the WHOLE response: a round starts at the
  first unverified position s, accepts a = min(γ, run of accepts starting at s), then s += a + 1
  (the target's correction/bonus token). Mean accepted per round, over rounds whose full window fits
  in the response. Unlike the two from-position-0 measures it is not dominated by the stereotyped
  openings (reference §9.1 caveat i). It is exact SD acceptance when row t of the drafter conditions
  on the target's tokens < t (``shared_prefix`` / ``retf`` stores), since while drafts match, the
  drafter's own prefix equals the verified one.

``<basis>`` is ``token`` (top-1 of the target LM head on the prediction == the target's own next
token; needs an LM head) or ``cos@τ`` (a hidden-state proxy: cosine > τ counts as accepted).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from egpt_core.errors import ConfigError
from egpt_core.training.similarity import DEFAULT_TAUS, accepted, cosine_rows

__all__ = ["DEFAULT_TAUS", "MetricAccumulator", "primary_basis", "summary_from", "tau_key"]
DEFAULT_GAMMAS: tuple[int, ...] = tuple(range(1, 9))
TOPK: tuple[int, ...] = (1, 5, 10)
#: Token reference names recorded in the results.
REF_IDS = "target_response_ids"
REF_ARGMAX = "argmax_target_lm_head"


def tau_key(tau: float) -> str:
    """``0.9 -> '0.90'`` (the key used for τ everywhere in the results)."""
    return f"{tau:.2f}"


def _stats(values: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    """mean, std (unbiased, 0 for one value), min, max, median (numpy: midpoint for even counts)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "median": None}
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
        "median": float(np.median(a)),
    }


def runs_from_each_position(ok: torch.Tensor) -> torch.Tensor:
    """``ok [B, S] bool -> [B, S] long``: number of consecutive True values starting at each position."""
    B, S = ok.shape
    out = torch.zeros(B, S + 1, dtype=torch.long, device=ok.device)
    okl = ok.long()
    for t in range(S - 1, -1, -1):
        out[:, t] = okl[:, t] * (out[:, t + 1] + 1)
    return out[:, :S]


def simulate_rounds(run_from: torch.Tensor, lengths: torch.Tensor, gamma: int) -> dict[str, torch.Tensor]:
    """Simulate speculative rounds with draft window ``gamma`` over each pair's whole response.

    ``run_from [B, S]`` = runs of accepts starting at each position (:func:`runs_from_each_position`),
    ``lengths [B]``. Returns per-pair tensors: ``accepted`` / ``rounds`` over all rounds, and
    ``accepted_full`` / ``rounds_full`` over the rounds whose whole window lies inside the response.
    """
    B, S = run_from.shape
    z = torch.zeros(B, dtype=torch.long, device=run_from.device)
    s, acc, rounds, acc_full, rounds_full = z.clone(), z.clone(), z.clone(), z.clone(), z.clone()
    lengths = lengths.long()
    active = s < lengths
    while bool(active.any()):
        a = run_from.gather(1, s.clamp(max=S - 1)[:, None]).squeeze(1).clamp(max=gamma) * active
        full = active & (s + gamma <= lengths)
        acc += a
        rounds += active.long()
        acc_full += a * full
        rounds_full += full.long()
        s = s + (a + 1) * active
        active = s < lengths
    return {"accepted": acc, "rounds": rounds, "accepted_full": acc_full, "rounds_full": rounds_full}


def simulated_acceptance_length(probs: Sequence[float], gamma: int) -> float:
    """SpecForge ``simulated_acc_len``: Σ_{k=1..γ} Π_{j<k} p_j (positions beyond ``probs`` count as 0)."""
    total, prod = 0.0, 1.0
    for k in range(gamma):
        prod *= float(probs[k]) if k < len(probs) else 0.0
        total += prod
    return total


class _RunTracker:
    """Per-basis state: accept counts (pooled + per position), leading runs, SD-round simulation."""

    def __init__(self, n_pos: int, gammas: Sequence[int]):
        self.gammas = list(gammas)
        self.count = 0
        self.per_pos = torch.zeros(n_pos, dtype=torch.float64)
        self.lead_runs: list[int] = []
        self.run_hist: list[int] = []
        self.rounds = {g: np.zeros(4, dtype=np.int64) for g in self.gammas}  # acc, rounds, acc_full, rounds_full

    def update(self, ok: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> None:
        # [B, S] bools: the sequential run/round loops are cheaper on the CPU than as tiny GPU kernels
        ok = (ok & mask).cpu()
        lengths = lengths.cpu()
        self.count += int(ok.sum())
        n_pos = self.per_pos.numel()
        k = min(n_pos, ok.shape[1])
        self.per_pos[:k] += ok[:, :k].sum(0).double()
        run_from = runs_from_each_position(ok)
        lead = run_from[:, 0].tolist()
        self.lead_runs.extend(int(v) for v in lead)
        for v in lead:
            if v >= len(self.run_hist):
                self.run_hist.extend([0] * (v + 1 - len(self.run_hist)))
            self.run_hist[v] += 1
        for g in self.gammas:
            r = simulate_rounds(run_from, lengths, g)
            self.rounds[g] += np.array(
                [int(r["accepted"].sum()), int(r["rounds"].sum()), int(r["accepted_full"].sum()),
                 int(r["rounds_full"].sum())],
                dtype=np.int64,
            )

    def result(self, n_positions: int, pos_count: torch.Tensor, total_length: int) -> dict[str, Any]:
        rate = self.per_pos / pos_count.clamp(min=1)
        rate = torch.where(pos_count > 0, rate, torch.zeros_like(rate))
        probs = rate.tolist()
        lead = np.asarray(self.lead_runs, dtype=np.int64)
        st = _stats(lead)
        sim, emp, rnd, rnd_all, tpr = {}, {}, {}, {}, {}
        for g in self.gammas:
            sim[str(g)] = simulated_acceptance_length(probs, g)
            emp[str(g)] = float(np.minimum(lead, g).mean()) if lead.size else None
            acc, rounds, acc_full, rounds_full = (int(x) for x in self.rounds[g])
            rnd[str(g)] = acc_full / rounds_full if rounds_full else None
            rnd_all[str(g)] = acc / rounds if rounds else None
            tpr[str(g)] = total_length / rounds if rounds else None
        return {
            "rate": self.count / n_positions if n_positions else None,
            "count": self.count,
            "consecutive": {
                "mean": st["mean"], "std": st["std"], "median": st["median"], "min": st["min"],
                "max": st["max"], "histogram": list(self.run_hist),
            },
            "per_position_rate": probs,
            "acceptance_length": {
                "sim": sim,
                "empirical": emp,
                "rounds": rnd,
                "rounds_incl_truncated": rnd_all,
                "tokens_per_round": tpr,
                "rounds_counted": {str(g): int(self.rounds[g][3]) for g in self.gammas},
            },
        }


class MetricAccumulator:
    """Streaming metrics; memory is bounded by one batch (plus one scalar per pair per basis).

    ``lm_head [V, D]`` enables token metrics; logits are computed in row chunks of at most
    ``logits_chunk_bytes`` per logits matrix, so V = 32064 is fine on any device.
    """

    def __init__(
        self,
        taus: Sequence[float] = DEFAULT_TAUS,
        gammas: Sequence[int] = DEFAULT_GAMMAS,
        max_positions: int = 50,
        lm_head: torch.Tensor | None = None,
        *,
        hist_bins: int = 200,
        device: str | torch.device | None = None,
        logits_chunk_bytes: int = 64 << 20,
        lm_head_dtype: str | None = None,
    ):
        self.taus = sorted({float(t) for t in taus})
        self.gammas = sorted({int(g) for g in gammas})
        if not self.taus or any(not -1.0 <= t < 1.0 for t in self.taus):
            raise ValueError(f"taus must be non-empty and in [-1, 1): {list(taus)}")
        if not self.gammas or self.gammas[0] < 1:
            raise ValueError(f"gammas must be non-empty positive integers: {list(gammas)}")
        if max_positions < 1:
            raise ValueError("max_positions must be >= 1")
        self.max_positions = int(max_positions)
        self.n_pos = max(self.max_positions, self.gammas[-1])
        self.device = torch.device(device) if device is not None else (
            lm_head.device if lm_head is not None else torch.device("cpu"))
        self.lm_head = None if lm_head is None else lm_head.detach().to(self.device, torch.float32)
        # the store's head precision: when it is float32, top-1 is also taken with the head rounded to
        # bf16 and the positions whose argmax flips are counted (near ties over the vocabulary)
        self.lm_head_dtype = lm_head_dtype or (None if lm_head is None else str(lm_head.dtype).removeprefix("torch."))
        self.lm_head_bf16 = (self.lm_head.to(torch.bfloat16).float()
                             if self.lm_head is not None and self.lm_head_dtype == "float32" else None)
        self.flips = {"pred": 0, "target": 0}
        self.logits_chunk_bytes = int(logits_chunk_bytes)
        self.hist_bins = int(hist_bins)

        self.n_positions = 0
        self.cos_sum = 0.0
        self.cos_sumsq = 0.0
        self.cos_min = math.inf
        self.cos_max = -math.inf
        self.cos_hist = torch.zeros(self.hist_bins, dtype=torch.float64)
        self.pair_cos_means: list[float] = []
        self.pair_lengths: list[int] = []
        self.pos_count = torch.zeros(self.n_pos, dtype=torch.float64)
        self.pos_cos_sum = torch.zeros(self.n_pos, dtype=torch.float64)
        self.cos_runs = {t: _RunTracker(self.n_pos, self.gammas) for t in self.taus}
        # token metrics
        self.token_runs = _RunTracker(self.n_pos, self.gammas) if self.lm_head is not None else None
        self.topk_hits = dict.fromkeys(TOPK, 0)
        self.argmax_agree = 0
        self.pos_argmax_agree = torch.zeros(self.n_pos, dtype=torch.float64)
        self.ref_from_ids = 0
        self.ref_from_argmax = 0
        self.self_match = 0

    # ------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int | None:
        return None if self.lm_head is None else int(self.lm_head.shape[0])

    @torch.no_grad()
    def update(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor,
        target_tokens: torch.Tensor | None = None,
    ) -> None:
        """Add one padded batch. ``mask[b, t]`` marks valid rows; rows with no valid position are ignored.

        ``target_tokens [B, S]``: the target's own next token per row (its stored response ids);
        negative entries (or ``None``) fall back to argmax of the LM head on the target row.
        """
        if pred.dim() != 3 or pred.shape != target.shape or tuple(mask.shape) != tuple(pred.shape[:2]):
            raise ValueError(
                f"expected pred/target [B, S, D] and mask [B, S]; got {tuple(pred.shape)}, "
                f"{tuple(target.shape)}, {tuple(mask.shape)}")
        if target_tokens is not None and tuple(target_tokens.shape) != tuple(mask.shape):
            raise ValueError(f"target_tokens must be [B, S]; got {tuple(target_tokens.shape)}")
        mask = mask.to(self.device, torch.bool)
        keep = mask.any(1)
        if not bool(keep.any()):
            return
        pred = pred.to(self.device, torch.float32)[keep]
        target = target.to(self.device, torch.float32)[keep]
        mask = mask[keep]
        if target_tokens is not None:
            target_tokens = target_tokens.to(self.device, torch.long)[keep]
        lengths = mask.sum(1)

        cos = cosine_rows(pred, target, mask)  # the training history's cosine (one definition)
        vals = cos[mask]
        n = int(vals.numel())
        self.n_positions += n
        v64 = vals.double()
        self.cos_sum += float(v64.sum())
        self.cos_sumsq += float((v64 * v64).sum())
        self.cos_min = min(self.cos_min, float(vals.min()))
        self.cos_max = max(self.cos_max, float(vals.max()))
        self.cos_hist += torch.histc(vals.clamp(-1.0, 1.0).cpu(), bins=self.hist_bins, min=-1.0, max=1.0).double()
        self.pair_cos_means.extend((cos.sum(1).double() / lengths).cpu().tolist())
        self.pair_lengths.extend(int(v) for v in lengths.cpu().tolist())
        k = min(self.n_pos, cos.shape[1])
        self.pos_count[:k] += mask[:, :k].sum(0).double().cpu()
        self.pos_cos_sum[:k] += cos[:, :k].sum(0).double().cpu()
        for t in self.taus:
            self.cos_runs[t].update(accepted(cos, t), mask, lengths)

        if self.lm_head is not None:
            self._update_tokens(pred, target, mask, target_tokens, lengths)

    def _update_tokens(self, pred, target, mask, target_tokens, lengths) -> None:
        W = self.lm_head
        V = W.shape[0]
        pv, tv = pred[mask], target[mask]
        ids = target_tokens[mask] if target_tokens is not None else torch.full(
            (pv.shape[0],), -1, dtype=torch.long, device=self.device)
        if bool((ids >= V).any()):
            raise ConfigError(
                f"target token id {int(ids.max())} >= LM head vocabulary {V}: the store's LM head does not "
                "belong to the target tokenizer; re-extract the LM head (write_lm_head) from the target")
        chunk = max(1, self.logits_chunk_bytes // (4 * V))
        kmax = min(max(TOPK), V)
        top1 = torch.empty(pv.shape[0], dtype=torch.bool, device=self.device)
        agree = torch.empty_like(top1)
        hits = {k: 0 for k in TOPK}
        for i in range(0, pv.shape[0], chunk):
            lp = pv[i:i + chunk] @ W.T
            lt = tv[i:i + chunk] @ W.T
            arg_p = lp.argmax(1)
            arg_t = lt.argmax(1)
            idc = ids[i:i + chunk]
            has_id = idc >= 0
            ref = torch.where(has_id, idc, arg_t)
            self.ref_from_ids += int(has_id.sum())
            self.ref_from_argmax += int((~has_id).sum())
            self.self_match += int((has_id & (arg_t == idc)).sum())
            hit1 = arg_p == ref
            top = lp.topk(kmax, dim=1).indices
            for k in TOPK:
                hits[k] += int(((top[:, :k] == ref[:, None]).any(1) | hit1).sum())
            top1[i:i + chunk] = hit1
            agree[i:i + chunk] = arg_p == arg_t
            if self.lm_head_bf16 is not None:
                self.flips["pred"] += int(((pv[i:i + chunk] @ self.lm_head_bf16.T).argmax(1) != arg_p).sum())
                self.flips["target"] += int(((tv[i:i + chunk] @ self.lm_head_bf16.T).argmax(1) != arg_t).sum())
        for k in TOPK:
            self.topk_hits[k] += hits[k]
        self.argmax_agree += int(agree.sum())
        ok = torch.zeros_like(mask)
        ok[mask] = top1
        ag = torch.zeros_like(mask)
        ag[mask] = agree
        n = min(self.n_pos, mask.shape[1])
        self.pos_argmax_agree[:n] += ag[:, :n].sum(0).double().cpu()
        self.token_runs.update(ok, mask, lengths)

    # ------------------------------------------------------------------------------------------
    def token_reference(self) -> str | None:
        if self.lm_head is None:
            return None
        if self.ref_from_ids and self.ref_from_argmax:
            return "mixed"
        return REF_IDS if self.ref_from_ids else REF_ARGMAX

    def result(self) -> dict[str, Any]:
        """All metrics as a JSON-able dict (see module doc); ``summary`` holds the headline scalars.
        The document is assembled in one place (~65 lines of short blocks, one per metric family)."""
        n = self.n_positions
        n_pairs = len(self.pair_cos_means)
        total_len = int(sum(self.pair_lengths))
        if n:
            mean = self.cos_sum / n
            var = max(0.0, (self.cos_sumsq - n * mean * mean) / (n - 1)) if n > 1 else 0.0
            pooled = {"mean": mean, "std": math.sqrt(var), "min": self.cos_min, "max": self.cos_max,
                      "median_hist": self._hist_median()}
        else:
            pooled = {"mean": None, "std": None, "min": None, "max": None, "median_hist": None}
        pair = _stats(self.pair_cos_means)
        lengths = _stats(self.pair_lengths)
        cos_basis = {tau_key(t): tr.result(n, self.pos_count, total_len) for t, tr in self.cos_runs.items()}
        P = self.max_positions
        pc = self.pos_count[:P]
        valid = pc > 0
        last = int(valid.nonzero().max()) + 1 if bool(valid.any()) else 0

        def per_pos(x: torch.Tensor) -> list[float | None]:
            r = (x[:P] / pc.clamp(min=1)).tolist()
            return [v if ok else None for v, ok in zip(r, valid.tolist())][:last]

        per_position: dict[str, Any] = {
            "position": list(range(last)),
            "count": [int(c) for c in pc.tolist()[:last]],
            "cos_mean": per_pos(self.pos_cos_sum),
            "accept": {k: per_pos(self.cos_runs[t].per_pos) for k, t in zip(cos_basis, self.taus)},
        }
        out: dict[str, Any] = {
            "taus": self.taus,
            "gammas": self.gammas,
            "max_positions": P,
            "counts": {"n_pairs": n_pairs, "n_positions": n, "length": lengths},
            "cos": {
                "pooled": pooled,
                "pair_mean": pair,
                "histogram": {"edges": torch.linspace(-1, 1, self.hist_bins + 1).tolist(),
                              "counts": [int(c) for c in self.cos_hist.tolist()]},
            },
            "accept": {k: v["rate"] for k, v in cos_basis.items()},
            "consecutive": {k: v["consecutive"] for k, v in cos_basis.items()},
            "acceptance_length": {f"cos@{k}": v["acceptance_length"] for k, v in cos_basis.items()},
            "token": None,
            "per_position": per_position,
        }
        if self.token_runs is not None:
            tok = self.token_runs.result(n, self.pos_count, total_len)
            out["token"] = {
                "reference": self.token_reference(),
                "n_reference_from_ids": self.ref_from_ids,
                "n_reference_from_argmax": self.ref_from_argmax,
                "target_lm_head_self_match": (self.self_match / self.ref_from_ids) if self.ref_from_ids else None,
                "vocab_size": self.vocab_size,
                **{f"top{k}": (self.topk_hits[k] / n if n else None) for k in TOPK},
                "argmax_agreement": self.argmax_agree / n if n else None,
                "consecutive": tok["consecutive"],
                "lm_head_precision": self._precision(n),
            }
            out["acceptance_length"]["token"] = tok["acceptance_length"]
            per_position["token_top1"] = per_pos(self.token_runs.per_pos)
            per_position["argmax_agreement"] = per_pos(self.pos_argmax_agree)
        out["summary"] = summary_from(out)
        return json_safe(out)

    def _precision(self, n: int) -> dict[str, Any]:
        """How many positions' top-1 changes between the float32 head and the same head in bf16."""
        if self.lm_head_bf16 is None:
            return {"store_dtype": self.lm_head_dtype, "positions": n, "top1_changed_pred": None,
                    "top1_changed_target": None,
                    "note": "the store's LM head is not float32: extract with lm_head_dtype='float32' to measure"}
        return {"store_dtype": "float32", "positions": n, "compared_with": "bfloat16",
                "top1_changed_pred": self.flips["pred"], "top1_changed_target": self.flips["target"],
                "top1_changed_pred_rate": self.flips["pred"] / n if n else None}

    def _hist_median(self) -> float | None:
        total = float(self.cos_hist.sum())
        if total <= 0:
            return None
        cum = torch.cumsum(self.cos_hist, 0)
        i = int(torch.searchsorted(cum, torch.tensor(total / 2, dtype=torch.float64)))
        i = min(i, self.hist_bins - 1)
        width = 2.0 / self.hist_bins
        before = float(cum[i - 1]) if i > 0 else 0.0
        frac = (total / 2 - before) / float(self.cos_hist[i]) if float(self.cos_hist[i]) else 0.5
        return -1.0 + width * (i + frac)


def primary_basis(metrics: dict[str, Any]) -> str | None:
    """The acceptance basis used for headline acceptance length / speedup: token if available, else cos@0.90
    (or the τ closest to 0.90)."""
    al = metrics.get("acceptance_length") or {}
    if "token" in al:
        return "token"
    cos_keys = [k for k in al if k.startswith("cos@")]
    if not cos_keys:
        return None
    return min(cos_keys, key=lambda k: abs(float(k[4:]) - 0.90))


def summary_from(m: dict[str, Any]) -> dict[str, Any]:
    """Flat dict of headline scalars with explicit names (what EvalResult.metrics and comparisons use)."""
    s: dict[str, Any] = {
        "n_pairs": m["counts"]["n_pairs"],
        "n_positions": m["counts"]["n_positions"],
        "length_mean": m["counts"]["length"]["mean"],
        "cos_pooled": m["cos"]["pooled"]["mean"],
        "cos_pooled_std": m["cos"]["pooled"]["std"],
        "cos_pooled_min": m["cos"]["pooled"]["min"],
        "cos_pooled_max": m["cos"]["pooled"]["max"],
        "cos_pair_mean": m["cos"]["pair_mean"]["mean"],
        "cos_pair_mean_std": m["cos"]["pair_mean"]["std"],
        "cos_pair_mean_min": m["cos"]["pair_mean"]["min"],
        "cos_pair_mean_max": m["cos"]["pair_mean"]["max"],
    }
    for k, v in m["accept"].items():
        s[f"accept@{k}"] = v
    for k, v in m["consecutive"].items():
        s[f"consecutive@{k}_mean"] = v["mean"]
        s[f"consecutive@{k}_median"] = v["median"]
        s[f"consecutive@{k}_max"] = v["max"]
    tok = m.get("token")
    if tok:
        for key in ("top1", "top5", "top10", "argmax_agreement"):
            s[f"token_{key}" if key != "argmax_agreement" else key] = tok[key]
        s["token_consecutive_mean"] = tok["consecutive"]["mean"]
        s["token_reference"] = tok["reference"]
        s["target_lm_head_self_match"] = tok["target_lm_head_self_match"]
        prec = tok.get("lm_head_precision") or {}
        s["top1_changed_bf16_head"] = prec.get("top1_changed_pred")
    basis = primary_basis(m)
    if basis is not None:
        s["acc_len_basis"] = basis
        al = m["acceptance_length"][basis]
        for kind in ("sim", "empirical", "rounds"):
            for g, v in al[kind].items():
                s[f"acc_len_{kind}_gamma{g}"] = v
    return s


def json_safe(obj: Any) -> Any:
    """``obj`` as plain JSON values: non-finite floats -> None, keys -> str, numpy scalars -> Python ones
    (the metrics documents of evaluation and of speculative runs)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj
