"""Text, vocabulary and position alignment between a student's and a teacher's tokenizers.

The rules are stated in :mod:`autoskd.lm.cross_tokenizer` (which re-exports this module's
public names): exact bytes per token (:func:`token_bytes`), exact string matches between the
vocabularies (:func:`shared_vocab`), and the teacher position that read the same text as each
student position (:class:`CrossTokenizerAligner`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import AutoSKDError
from .cross_tokenizer_loss import SharedVocab
from .data import tokenizer_fingerprint

ALIGN_RULES = ("token", "context")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable char -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


_BYTES_OF = _byte_decoder()


def _decoder_kind(tokenizer) -> str:
    try:
        state = json.loads(tokenizer.backend_tokenizer.decoder.__getstate__())
    except Exception:  # noqa: BLE001  (a slow tokenizer, or no decoder)
        return "other"
    text = json.dumps(state)
    if '"ByteLevel"' in text:
        return "byte_level"
    return "metaspace" if ("ByteFallback" in text or "Metaspace" in text or "\u2581" in text) else "other"


def token_bytes(tokenizer) -> list[bytes | None]:
    """The exact bytes of every token id (``None``: a special token). Cached on the tokenizer."""
    size = len(tokenizer)
    cached = getattr(tokenizer, "_autoskd_token_bytes", None)
    if cached is not None and len(cached) == size:  # (a token added since, e.g. <pad>: rebuilt)
        return cached
    kind = _decoder_kind(tokenizer)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials = set(tokenizer.all_special_ids) | {i for i, tok in added.items() if tok.special}
    out: list[bytes | None] = []
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(size)))):
        if i in specials or piece is None:
            out.append(None)
        elif i in added:
            out.append(added[i].content.encode("utf-8"))
        elif kind == "byte_level" and all(c in _BYTES_OF for c in piece):
            out.append(bytes(_BYTES_OF[c] for c in piece))
        elif kind == "metaspace":
            match = _BYTE_PIECE.fullmatch(piece)
            out.append(bytes([int(match.group(1), 16)]) if match else piece.replace("\u2581", " ").encode("utf-8"))
        else:
            out.append(tokenizer.decode([i]).encode("utf-8"))
    tokenizer._autoskd_token_bytes = out
    return out


def shared_vocab(student_tokenizer, teacher_tokenizer, student_size: int | None = None,
                 teacher_size: int | None = None) -> SharedVocab:
    """Exact one-to-one matches of token strings (bytes); EOS/BOS by role, other specials by
    text. Where a vocabulary has two tokens with the same bytes (a ``<0x20>`` byte piece and
    ``▁``), the one that is not a byte piece, then the lower id, takes part."""
    def table(tok):
        out: dict[bytes, int] = {}
        for i, b in enumerate(token_bytes(tok)):
            if b is None:
                continue
            old = out.get(b)
            if old is None or (_is_byte_piece(tok, old) and not _is_byte_piece(tok, i)):
                out[b] = i
        return out

    s_tab, t_tab = table(student_tokenizer), table(teacher_tokenizer)
    vt = teacher_size or len(teacher_tokenizer)
    vs = student_size or len(student_tokenizer)
    t2s = torch.full((max(vt, len(teacher_tokenizer)),), -1, dtype=torch.long)
    for b, ti in t_tab.items():
        si = s_tab.get(b)
        if si is not None:
            t2s[ti] = si
    used = set(t2s[t2s >= 0].tolist())
    pairs = [(getattr(teacher_tokenizer, f"{role}_token_id"), getattr(student_tokenizer, f"{role}_token_id"))
             for role in ("eos", "bos")]  # by role first, then specials by their text
    s_special = {student_tokenizer.convert_ids_to_tokens(i): i for i in student_tokenizer.all_special_ids}
    pairs += [(ti, s_special.get(teacher_tokenizer.convert_ids_to_tokens(ti)))
              for ti in teacher_tokenizer.all_special_ids]
    for ti, si in pairs:
        if ti is not None and si is not None and t2s[ti] < 0 and si not in used:
            t2s[ti] = si
            used.add(si)
    t2s = t2s[:vt] if t2s.numel() > vt else torch.cat([t2s, t2s.new_full((vt - t2s.numel(),), -1)])
    shared = torch.zeros(max(vs, int(t2s.max()) + 1 if t2s.numel() else 0), dtype=torch.bool)
    shared[t2s[t2s >= 0]] = True
    return SharedVocab(t2s, shared)


def _is_byte_piece(tokenizer, i: int) -> bool:
    return bool(_BYTE_PIECE.fullmatch(tokenizer.convert_ids_to_tokens(i) or ""))


def _uses_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos is not None and bool(ids) and ids[0] == bos


def _char_ends(text: str) -> np.ndarray:
    """Byte offset -> character offset in ``text`` (its UTF-8 bytes, surrogate-escaped bytes
    counting one each); -1 where a byte offset falls inside a character."""
    lengths = [len(c.encode("utf-8", "surrogateescape")) for c in text]
    out = np.full(sum(lengths) + 1, -1, dtype=np.int64)
    out[np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])] = np.arange(len(text) + 1)
    return out


@dataclass
class AlignedRows:
    """A batch of student rows read by the teacher: ``teacher_ids`` (one list per row) and
    ``positions`` ``[B, T]``, the aligned teacher position of each student position (-1: none)."""

    teacher_ids: list[list[int]]
    positions: torch.Tensor

    def padded(self, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded teacher ``input_ids`` and ``attention_mask``."""
        width = max(1, max(len(r) for r in self.teacher_ids))
        ids = torch.full((len(self.teacher_ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(self.teacher_ids):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row, dtype=torch.long), 1
        return ids, mask


class CrossTokenizerAligner:
    """Student rows -> the teacher's tokenisation of the same text and the aligned positions."""

    def __init__(self, student_tokenizer, teacher_tokenizer, rule: str = "token", max_length: int | None = None):
        if rule not in ALIGN_RULES:
            raise AutoSKDError(f"align rule {rule!r} unknown; use one of: {', '.join(ALIGN_RULES)}")
        self.student, self.teacher, self.rule, self.max_length = student_tokenizer, teacher_tokenizer, rule, max_length
        self.s_bytes, self.t_bytes = token_bytes(student_tokenizer), token_bytes(teacher_tokenizer)
        self.s_eos, self.s_bos = student_tokenizer.eos_token_id, student_tokenizer.bos_token_id
        self.t_eos, self.t_bos = teacher_tokenizer.eos_token_id, teacher_tokenizer.bos_token_id
        self.t_uses_bos = _uses_bos(teacher_tokenizer)
        probe = student_tokenizer("a", add_special_tokens=False)["input_ids"]
        self.s_prefix_space = b"".join(self.s_bytes[i] or b"" for i in probe) == b" a"

    @property
    def key(self) -> str:
        """What the teacher's tokenisation of a split depends on besides the split itself."""
        return f"xtok-v1|teacher-tok-{tokenizer_fingerprint(self.teacher)}|align-{self.rule}|len-{self.max_length}"

    def _groups(self, ids: Sequence[int]) -> list[tuple[bool, list[int]]]:
        """Runs of (is_special, token indices), with an empty special run first when the row
        starts with text (the row start is a document start for the teacher)."""
        groups: list[tuple[bool, list[int]]] = []
        for i, tok in enumerate(ids):
            special = tok >= len(self.s_bytes) or self.s_bytes[tok] is None
            if groups and groups[-1][0] == special:
                groups[-1][1].append(i)
            else:
                groups.append((special, [i]))
        return groups if groups and groups[0][0] else [(True, [])] + groups

    def align(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> AlignedRows:
        rows = input_ids.tolist()
        lengths = attention_mask.sum(1).tolist() if attention_mask is not None else [len(r) for r in rows]
        plans, texts = [], []
        for row, n in zip(rows, lengths):
            plan = []
            after_special = False
            for special, idx in self._groups(row[: int(n)]):
                if special:
                    plan.append((True, idx, None))
                else:
                    data = b"".join(self.s_bytes[row[i]] for i in idx)
                    skip = int(after_special and self.s_prefix_space and data.startswith(b" "))
                    text = data[skip:].decode("utf-8", "surrogateescape")
                    plan.append((False, idx, (len(texts), skip, text)))
                    texts.append(re.sub("[\udc80-\udcff]", "\ufffd", text))
                after_special = special
            plans.append(plan)
        enc = self.teacher(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False) if texts else {}
        encs, offsets = enc.get("input_ids", []), enc.get("offset_mapping", [])
        positions = torch.full(input_ids.shape, -1, dtype=torch.long)
        teacher_rows = []
        for r, (row, plan) in enumerate(zip(rows, plans)):
            s_ctx, s_span, t_ids, t_ctx, t_span = {}, {}, [], [], []
            pos = 0
            for special, idx, text_info in plan:
                if special:
                    self._special_run(row, idx, pos, s_ctx, s_span, t_ids, t_ctx, t_span)
                    pos += 2
                    continue
                k, skip, text = text_info
                ends = _char_ends(text)
                done = -skip
                for i in idx:
                    done += len(self.s_bytes[row[i]])
                    c = int(ends[done]) if 0 < done < len(ends) else -1
                    s_ctx[i] = s_span[i] = pos + c if c >= 0 else None
                for tid, end in zip(encs[k], self._teacher_ends(encs[k], offsets[k], texts[k])):
                    t_ids.append(tid)
                    t_ctx.append(None if end is None else pos + end)
                    t_span.append(t_ctx[-1])
                pos += len(text)
            if self.max_length is not None and len(t_ids) > self.max_length:
                t_ids, t_ctx, t_span = t_ids[: self.max_length], t_ctx[: self.max_length], t_span[: self.max_length]
            teacher_rows.append(t_ids)
            by_end = {e: j for j, e in enumerate(t_ctx) if e is not None}
            for t in range(int(lengths[r])):
                j = by_end.get(s_ctx.get(t)) if s_ctx.get(t) is not None else None
                if j is None:
                    continue
                if self.rule == "token":
                    nxt = s_span.get(t + 1)
                    if nxt is None or j + 1 >= len(t_span) or t_span[j + 1] != nxt:
                        continue
                positions[r, t] = j
        return AlignedRows(teacher_rows, positions)

    def _special_run(self, row, idx, pos, s_ctx, s_span, t_ids, t_ctx, t_span) -> None:
        """A run of special tokens at ``pos`` (two units): the student's ends, and the teacher's
        EOS (where the student has one) and BOS (when the teacher starts documents with it)."""
        toks = [row[i] for i in idx]
        for n, (i, tok) in enumerate(zip(idx, toks)):
            last = n == len(idx) - 1
            eos_then_bos = tok == self.s_eos and not last and toks[n + 1] == self.s_bos
            s_ctx[i] = pos + 2 if last else (pos + 1 if eos_then_bos else None)
            s_span[i] = pos + 2 if tok in (self.s_eos, self.s_bos) else None
        emit = []
        if self.s_eos in toks and self.t_eos is not None:
            emit.append(self.t_eos)
        if self.t_uses_bos and (not idx or self.s_eos in toks or self.s_bos in toks):
            emit.append(self.t_bos)
        for n, tok in enumerate(emit):
            t_ids.append(tok)
            t_ctx.append(pos + 2 if n == len(emit) - 1 else pos + 1)
            t_span.append(pos + 2)

    def _teacher_ends(self, ids: list[int], offsets: list, text: str) -> list[int | None]:
        """Character end of each teacher token (None: ends inside a character, or shares its
        end with the next token). Exact from the token bytes when they spell the text, else
        from the tokenizer's offsets."""
        pieces = [self.t_bytes[i] if i < len(self.t_bytes) else None for i in ids]
        if all(p is not None for p in pieces) and b"".join(pieces) == text.encode("utf-8"):
            ends, done, out = _char_ends(text), 0, []
            for p in pieces:
                done += len(p)
                out.append(int(ends[done]) if ends[done] >= 0 else None)
            return out
        raw = [int(e) for _, e in offsets]
        return [e if (n + 1 == len(raw) or raw[n + 1] != e) else None for n, e in enumerate(raw)]
