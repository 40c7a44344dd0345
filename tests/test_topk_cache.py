"""The LM teacher's top-k cache: correctness of the table, row order, keys, atomic files, sizing."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from autoskd.engine.token_losses import TopK, forward_kl
from autoskd.errors import AutoSKDError
from autoskd.lm.topk_cache import (PAD_LOGPROB, TopKCache, TopKTable, check_dense_size, compute_topk_table,
                                   dense_table_bytes)

V = 23
LENGTHS = [5, 3, 7, 2, 6, 4, 7, 1, 3]


class TinyLM(nn.Module):
    """Embedding + linear head; its forward takes only what a causal LM gets."""

    def __init__(self, vocab: int = V, wrap: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head, self.wrap, self.calls = nn.Embedding(vocab, 8), nn.Linear(8, vocab), wrap, 0

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        logits = self.head(self.emb(input_ids)) * 3
        return SimpleNamespace(logits=logits) if self.wrap else logits


class Rows(Dataset):
    def __init__(self, lengths=LENGTHS, vocab: int = V):
        g = torch.Generator().manual_seed(1)
        self.rows = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"ids": self.rows[i], "idx": i}


def collate(items, left: bool = False):
    """Right-pad to the batch's longest row; targets: next token, -100 on the last and padding."""
    t = max(len(x["ids"]) for x in items)
    ids = torch.zeros(len(items), t, dtype=torch.long)
    mask = torch.zeros(len(items), t, dtype=torch.long)
    for r, x in enumerate(items):
        n = len(x["ids"])
        sl = slice(t - n, t) if left else slice(0, n)
        ids[r, sl], mask[r, sl] = x["ids"], 1
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
    return {"input_ids": ids, "attention_mask": mask, "target_ids": targets,
            "idx": torch.tensor([x["idx"] for x in items])}


def _loader(shuffle: bool = True, batch_size: int = 4, **kw) -> DataLoader:
    return DataLoader(Rows(**kw), batch_size=batch_size, shuffle=shuffle, collate_fn=collate,
                      generator=torch.Generator().manual_seed(7))


def _reference(model: TinyLM, i: int, tau: float = 1.0, data: Rows | None = None) -> torch.Tensor:
    ids = (data or Rows()).rows[i]
    with torch.no_grad():
        out = model(ids[None])
    return torch.log_softmax(out.logits[0].float() / tau, -1)


def test_table_holds_true_topk_in_idx_order_and_leaves_shuffling_alone():
    model, loader = TinyLM(), _loader(shuffle=True)
    state = loader.generator.get_state().clone()
    table = compute_topk_table(model, loader, k=5, temperature=2.0, progress=False)
    assert torch.equal(loader.generator.get_state(), state)
    assert table.ids.dtype == torch.int32 and table.logprobs.dtype == torch.float16
    assert table.ids.shape == (len(LENGTHS), max(LENGTHS), 5) and table.temperature == 2.0
    for i, n in enumerate(LENGTHS):
        ref = _reference(model, i, tau=2.0)
        vals, ids = ref.topk(5, -1)
        assert torch.equal(table.ids[i, :n].long(), ids)
        assert torch.allclose(table.logprobs[i, :n].float(), vals, atol=1e-2, rtol=1e-3)
        assert torch.allclose(table.logprobs[i, :n].float(), ref.gather(-1, table.ids[i, :n].long()), atol=1e-2)
        assert (table.logprobs[i, n:] == PAD_LOGPROB).all()  # shorter rows padded, never counted


def test_rows_returns_topk_in_requested_order_and_length():
    table = compute_topk_table(TinyLM(), _loader(), k=4, progress=False)
    top = table.rows(torch.tensor([3, 0, 6]), length=5)
    assert isinstance(top, TopK) and top.ids.dtype == torch.int64 and top.logprobs.dtype == torch.float32
    assert top.ids.shape == (3, 5, 4) and top.temperature == 1.0
    assert torch.equal(top.ids[1], table.ids[0, :5].long())
    assert torch.isfinite(top.tail).all()
    with pytest.raises(AutoSKDError):
        table.rows(torch.tensor([0]), length=table.length + 1)


def test_model_output_may_be_a_tensor_and_gets_only_model_inputs():
    a = compute_topk_table(TinyLM(wrap=False), _loader(), k=3, progress=False)
    b = compute_topk_table(TinyLM(wrap=True), _loader(shuffle=False, batch_size=2), k=3, progress=False)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.logprobs, b.logprobs)


def test_retained_mass_counts_only_target_positions():
    model = TinyLM()
    table = compute_topk_table(model, _loader(), k=3, progress=False)
    masses = []
    for i, n in enumerate(LENGTHS):  # targets exist on positions 0..n-2 of each row
        masses.append(_reference(model, i).topk(3, -1).values.exp().sum(-1)[: n - 1])
    assert table.retained_mass == pytest.approx(torch.cat(masses).mean().item(), rel=1e-5)
    assert 0 < table.retained_mass <= 1
    full = compute_topk_table(model, _loader(), k=V, progress=False)
    assert full.retained_mass == pytest.approx(1.0, abs=1e-5)


def test_full_vocab_table_reproduces_dense_loss():
    model, loader = TinyLM(), _loader(shuffle=False, batch_size=len(LENGTHS))
    table = compute_topk_table(model, loader, k=V, temperature=2.0, progress=False)
    batch = next(iter(loader))
    with torch.no_grad():
        teacher = model(batch["input_ids"]).logits
    student = torch.randn_like(teacher)
    mask = batch["target_ids"] != -100
    dense = forward_kl(student, teacher, temperature=2.0, mask=mask)
    sparse = forward_kl(student, table.rows(batch["idx"], length=teacher.shape[1]), temperature=2.0, mask=mask)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-2, abs=5e-3)  # fp16 log-probs


def test_bytes_per_token_and_validation():
    table = TopKTable(ids=torch.zeros(1, 2, 64, dtype=torch.int32), logprobs=torch.zeros(1, 2, 64, dtype=torch.float16),
                      temperature=1.0, k=64)
    assert table.bytes_per_token == 384
    with pytest.raises(ValueError):
        TopKTable(ids=torch.zeros(1, 2, 4, dtype=torch.int32), logprobs=torch.zeros(1, 2, 4), temperature=1.0, k=5)


def test_idx_with_gaps_and_left_padding_are_refused():
    class Gappy(Rows):
        def __getitem__(self, i):
            return {"ids": self.rows[i], "idx": 2 * i}

    with pytest.raises(ValueError, match="without gaps"):
        compute_topk_table(TinyLM(), DataLoader(Gappy(), batch_size=4, collate_fn=collate), k=2, progress=False)
    left = DataLoader(Rows(), batch_size=4, collate_fn=lambda b: collate(b, left=True))
    with pytest.raises(AutoSKDError, match="right-padded"):
        compute_topk_table(TinyLM(), left, k=2, progress=False)
    with pytest.raises(AutoSKDError, match="top_k"):
        compute_topk_table(TinyLM(), _loader(), k=V + 1, progress=False)


def test_vocab_size_cuts_padding_rows():
    model, loader = TinyLM(vocab=V + 3), _loader(vocab=V)
    table = compute_topk_table(model, loader, k=V, progress=False, vocab_size=V)
    assert int(table.ids.max()) < V and table.retained_mass == pytest.approx(1.0, abs=1e-5)


def test_store_load_round_trip_atomic_and_keyed(tmp_path):
    cache = TopKCache(tmp_path / "c")
    table = compute_topk_table(TinyLM(), _loader(), k=4, temperature=2.0, progress=False)
    path = cache.store("teach", "data", table)
    assert path.exists() and not list(path.parent.glob("*.tmp"))
    back = cache.load("teach", "data", 4, 2.0, expected_rows=len(LENGTHS), expected_len=max(LENGTHS))
    assert back is not None and back.ids.dtype == torch.int32 and back.logprobs.dtype == torch.float16
    assert torch.equal(back.ids, table.ids) and torch.equal(back.logprobs, table.logprobs)
    assert back.k == 4 and back.temperature == 2.0 and back.retained_mass == table.retained_mass
    keys = {cache.path("teach", "data", 4, 2.0), cache.path("teach", "data", 8, 2.0),
            cache.path("teach", "data", 4, 1.0), cache.path("teach", "other", 4, 2.0),
            cache.path("teach", "data", 4, 2.0, vocab_size=V)}
    assert len(keys) == 5
    assert cache.load("teach", "data", 8, 2.0) is None and cache.load("teach", "data", 4, 1.0) is None
    assert cache.load("teach", "data", 4, 2.0, expected_rows=3) is None
    assert cache.load("teach", "data", 4, 2.0, expected_len=3) is None


def test_mismatched_or_corrupted_file_is_rebuilt(tmp_path):
    cache, model = TopKCache(tmp_path), TinyLM()
    small = compute_topk_table(model, _loader(), k=4, progress=False)
    # a k=4 file sitting under the k=8 key (e.g. copied by hand) is not served
    shutil.copy(cache.store("t", "d", small), cache.path("t", "d", 8, 1.0))
    assert cache.load("t", "d", 8, 1.0) is None
    calls = model.calls
    table = cache.get_or_compute("t", "d", model, _loader(), 8, 1.0, progress=False)
    assert table.k == 8 and model.calls > calls
    assert cache.load("t", "d", 8, 1.0) is not None
    cache.path("t", "d", 8, 1.0).write_bytes(b"\x00garbage")
    assert cache.load("t", "d", 8, 1.0) is None
    rebuilt = cache.get_or_compute("t", "d", model, _loader(), 8, 1.0, progress=False)
    assert torch.equal(rebuilt.ids, table.ids)
    calls = model.calls
    again = cache.get_or_compute("t", "d", model, _loader(), 8, 1.0, progress=False)
    assert model.calls == calls and torch.equal(again.logprobs, table.logprobs)  # a hit runs no model


def test_dense_size_check():
    assert dense_table_bytes(10, 512, 50_257) == 10 * 512 * 50_257 * 4
    check_dense_size(10, 8, 100, limit_bytes=10**9)
    with pytest.raises(AutoSKDError) as err:
        check_dense_size(10_000, 512, 50_257, limit_bytes=8 * 10**9)
    msg = str(err.value)
    assert "\n" not in msg and "1029.3 GB" in msg and "top_k=64" in msg


def test_llama_teacher_output():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    table = compute_topk_table(model, _loader(), k=3, progress=False)
    data = Rows()
    for i in (0, 2):
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=data.rows[i][None]).logits[0].float(), -1)
        n = LENGTHS[i]
        assert torch.equal(table.ids[i, :n].long(), ref.topk(3, -1).indices)
