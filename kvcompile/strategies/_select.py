"""Shared machinery of token-selection strategies (sink_window, heavy_hitter, snapkv).

A selection strategy only decides *which* tokens survive: after each append it returns a priority
per stored slot and how many slots to keep; the store keeps the top slots (padding never, see
below) and re-sorts them by original position. Storage layout (FIXED, read by the kernels):

* ``k``, ``v``: [B, Hg, Nk, D] model dtype, ``pos``: int32 [B, Hg, Nk] original positions (cache
  index, counting left padding), sorted ascending per head; ``-1`` marks an empty slot (a row with
  fewer real tokens than the budget): attention must skip ``pos < 0``.
* ``score``: float32 [B, Hg, Nk] (heavy_hitter only): accumulated attention mass.

``Nk = min(tokens, cap)`` for every row, so ``nbytes`` is exactly ``bytes_for`` times B*Hg.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ._attn import leading_pads, masked_attention
from .base import Store, Strategy, tensor_bytes

TIER = 1e12  # priority offset: float64 keeps positions (< 2**40) exact on top of it


def keep_top(priority: torch.Tensor, pos: torch.Tensor, count: int) -> torch.Tensor:
    """Indices [B, Hg, count] of the ``count`` highest-priority slots, padding (pos < 0) last,
    re-ordered by ascending position (empty slots, pos = -1, first)."""
    prio = priority.masked_fill(pos < 0, -torch.inf)
    idx = prio.topk(count, dim=-1).indices
    order = torch.gather(pos, -1, idx).sort(dim=-1, stable=True).indices
    return torch.gather(idx, -1, order)


@dataclasses.dataclass(frozen=True)
class Selection(Strategy):
    """Base of token-selection strategies; subclasses set ``observe`` and implement ``priority``."""

    observe: ClassVar[str] = "none"  # which attention mass attend() records: none | all | window
    keeps_score: ClassVar[bool] = False

    def cap(self) -> int:
        """Most tokens a head holds after a prefill (budget)."""
        raise NotImplementedError

    def token_bytes(self, head_dim: int, dtype_bytes: int) -> int:
        """Bytes per kept token: K, V in the model dtype + int32 position (+ float32 score)."""
        return 2 * head_dim * dtype_bytes + 4 + (4 if self.keeps_score else 0)

    def kept(self, tokens: int) -> int:
        """Tokens a head holds after a prefill of ``tokens`` (empty slots of short rows included)."""
        return min(tokens, self.cap())

    def kept_seq(self, prefill: int, decoded: int) -> int:
        """Tokens held after a prefill then ``decoded`` later tokens (eviction after every append)."""
        return self.kept(prefill + decoded)

    def bytes_for(self, tokens: int, head_dim: int, dtype_bytes: int) -> int:
        return self.kept(tokens) * self.token_bytes(head_dim, dtype_bytes)

    def bytes_for_seq(self, prefill: int, decoded: int, head_dim: int, dtype_bytes: int) -> int:
        return self.kept_seq(prefill, decoded) * self.token_bytes(head_dim, dtype_bytes)

    def validate_for(self, *, head_dim: int, context: int | None = None) -> None:
        if context is not None and self.cap() >= context:
            raise ValueError(f"{self.label()}: budget/window {self.cap()} larger than context={context}")

    def kernel_format(self) -> str:
        return "compact"

    def priority(
        self, pos: torch.Tensor, mass: torch.Tensor | None, lead: torch.Tensor, seen: int, prefill: int
    ) -> tuple[torch.Tensor, int] | None:
        """Slot priorities (float64 [B, Hg, N]) and the number to keep, or None to keep all.

        ``pos``: [B, Hg, N] positions (-1 = padding); ``mass``: accumulated (heavy_hitter) or
        observation-window (snapkv, prefill only) attention mass [B, Hg, N]; ``lead``: [B] left
        padding; ``seen``: tokens seen after this append; ``prefill``: tokens of the first append.
        """
        raise NotImplementedError

    def new_store(self, *, batch, num_heads, head_dim, gqa, dtype, device) -> SelectStore:
        return SelectStore(self, dtype)


class SelectStore(Store):
    """Runtime store of a :class:`Selection` strategy (layout in the module docstring)."""

    def __init__(self, strategy: Selection, dtype: torch.dtype) -> None:
        self.s, self.dtype = strategy, dtype
        self.k = self.v = self.pos = self.score = None
        self.lead: torch.Tensor | None = None
        self.prefill = 0
        self.tokens_seen = 0
        self._mass: torch.Tensor | None = None  # attention mass observed by the last attend()
        self.collect_evicted = False  # MiKV: keep the last append's evicted (k, v, pos) in .evicted
        self.evicted: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def attend(self, q, k_new, v_new, valid_new, scale):
        return self.attend_with(None, q, k_new, v_new, valid_new, scale)

    def attend_with(self, extra, q, k_new, v_new, valid_new, scale):
        """Attend over ``extra`` keys (K, V, validity [B, Hg|1, Ne], e.g. MiKV's low-bit tokens),
        then this store's tokens, then the new ones; observe the mass of the latter two."""
        B, Hg, T = k_new.shape[:3]
        parts = [] if extra is None else [(extra[0], extra[1], extra[2].expand(B, Hg, -1))]
        if self.k is not None:
            parts.append((self.k, self.v, self.pos >= 0))
        parts.append((k_new, v_new, valid_new[:, None, :].expand(B, Hg, T)))
        k = torch.cat([p[0].to(k_new.dtype) for p in parts], dim=2)
        v = torch.cat([p[1].to(v_new.dtype) for p in parts], dim=2)
        key_ok = torch.cat([p[2] for p in parts], dim=2)
        ne = 0 if extra is None else extra[0].shape[2]
        out, mass = masked_attention(q, k, v, key_ok, scale, col_sums=self.s.observe == "all")
        if self.s.observe == "window" and self.k is None:
            mass = self._window_mass(q, k, v, key_ok, scale)
        self._mass = None if mass is None else mass[..., ne:]
        return out

    def observe_prefill(self, q, k_new, v_new, valid_new, scale) -> None:
        """Record what :meth:`attend` would record for the next append, without its output (callers that
        only score, like calibration): a window observer's first append needs only the last
        ``obs_window`` queries' mass, not the quadratic context attention."""
        if self.s.observe != "window" or self.k is not None:
            self.attend(q, k_new, v_new, valid_new, scale)
            return
        B, Hg, T = k_new.shape[:3]
        self._mass = self._window_mass(q, k_new, v_new, valid_new[:, None, :].expand(B, Hg, T), scale)

    def _window_mass(self, q, k, v, key_ok, scale) -> torch.Tensor:
        """Attention mass [B, Hg, N] of the last ``obs_window`` queries over the keys (SnapKV's window)."""
        w = min(int(getattr(self.s, "obs_window", q.shape[2])), q.shape[2])
        mass = masked_attention(q[:, :, q.shape[2] - w :], k, v, key_ok, scale, col_sums=True)[1]
        assert mass is not None
        return mass

    def observe(self, mass: torch.Tensor) -> None:
        """Record attention mass computed elsewhere (a kernel that replaced :meth:`attend`):
        [B, Hg, Nk + T] float32 over the stored then the new tokens, summed over queries and the
        G query heads. H2O needs it every step; without it decode tokens add no score."""
        self._mass = mass

    def append(self, k_new, v_new, q_new, valid_new):
        B, Hg, T = k_new.shape[:3]
        first = self.k is None
        if first:
            self.lead = leading_pads(valid_new)
            self.prefill = T
        pos_new = torch.arange(self.tokens_seen, self.tokens_seen + T, dtype=torch.int32, device=k_new.device)
        pos_new = torch.where(valid_new, pos_new, -1)[:, None, :].expand(B, Hg, T)
        mass = self._mass
        if mass is None or mass.shape[-1] != (0 if first else self.pos.shape[-1]) + T:
            mass = None  # append without a matching attend: no observation
        self._mass = None
        k, v = k_new.to(self.dtype), v_new.to(self.dtype)
        if not first:
            k, v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
            pos_new = torch.cat([self.pos, pos_new], 2)
        pos = pos_new.contiguous()
        if self.s.keeps_score:
            old = torch.zeros(B, Hg, 0, device=k.device) if first else self.score
            acc = torch.cat([old, torch.zeros(B, Hg, T, device=k.device)], dim=2)
            mass = acc if mass is None else acc + mass
        self.tokens_seen += T
        choice = self.s.priority(pos, mass, self.lead, self.tokens_seen, self.prefill)
        self.evicted = None
        if choice is not None and choice[1] < pos.shape[-1]:
            idx = keep_top(choice[0], pos, choice[1])
            if self.collect_evicted:
                gone = torch.ones_like(pos, dtype=torch.bool).scatter_(2, idx, False)
                ev = gone.int().argsort(dim=2, descending=True, stable=True)[..., : pos.shape[-1] - choice[1]]
                ev = torch.gather(ev, 2, torch.gather(pos, 2, ev).sort(dim=2, stable=True).indices)
                self.evicted = (
                    torch.gather(k, 2, ev[..., None].expand(-1, -1, -1, k.shape[-1])),
                    torch.gather(v, 2, ev[..., None].expand(-1, -1, -1, v.shape[-1])),
                    torch.gather(pos, 2, ev),
                )
            k = torch.gather(k, 2, idx[..., None].expand(-1, -1, -1, k.shape[-1]))
            v = torch.gather(v, 2, idx[..., None].expand(-1, -1, -1, v.shape[-1]))
            pos = torch.gather(pos, 2, idx)
            if self.s.keeps_score:
                mass = torch.gather(mass, 2, idx)
        self.k, self.v, self.pos = k.contiguous(), v.contiguous(), pos.contiguous()
        if self.s.keeps_score:
            self.score = mass.contiguous()

    def nbytes(self) -> int:
        return tensor_bytes(self.k, self.v, self.pos, self.score)

    def crop(self, tokens: int) -> None:
        """Drop the slots of the newest ``tokens`` positions (always the last kept slots). Tokens they
        displaced stay evicted; H2O's scores already hold their queries' mass, so it refuses."""
        if not tokens or self.pos is None:
            return
        if self.s.keeps_score:
            raise NotImplementedError(f"{self.s.label()}: cannot crop (accumulated scores include the tokens)")
        newest = self.pos >= self.tokens_seen - tokens
        drop = newest.sum(dim=2)
        keep = self.pos.shape[2] - int(drop.flatten()[0])
        if bool((drop != drop.flatten()[0]).any()) or not bool(newest[..., keep:].all()):
            raise NotImplementedError(f"{self.s.label()}: rows kept different numbers of the newest tokens")
        self.k, self.v, self.pos = self.k[:, :, :keep], self.v[:, :, :keep], self.pos[:, :, :keep]
        self.tokens_seen -= tokens

    def tensors(self):
        names = ("k", "v", "pos", "score")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}
