"""Tiny decoder LMs and a small BPE tokenizer trained offline, for the language-model tests."""

from __future__ import annotations

import random

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ("the a film movie story cast plot was is good bad great dull funny long short and but with "
         "not very too quite an actor script scene ending every one").split()


def documents(n: int = 160, seed: int = 0) -> list[str]:
    """Short review-like documents with a learnable pattern (adjectives follow 'is'/'was')."""
    rng = random.Random(seed)
    adjectives = ["good", "bad", "great", "dull", "funny", "long", "short"]
    out = []
    for _ in range(n):
        noun = rng.choice(["film", "movie", "story", "cast", "plot", "script", "ending"])
        out.append(f"the {noun} {rng.choice(['is', 'was'])} {rng.choice(['very', 'too', 'quite'])} "
                   f"{rng.choice(adjectives)} and {rng.choice(['not', 'very'])} {rng.choice(adjectives)} .")
    return out


def bpe_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on :func:`documents` (no pad token, like most LMs)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents(400, seed=9) + [" ".join(WORDS)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def tiny_llama(vocab: int, layers: int = 2, hidden: int = 32, seed: int = 0, heads: int = 4,
               kv_heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=heads,
                                        num_key_value_heads=kv_heads, max_position_embeddings=128,
                                        tie_word_embeddings=True, eos_token_id=0, bos_token_id=0))


def tiny_gpt2(vocab: int, layers: int = 2, hidden: int = 32, seed: int = 0, heads: int = 4) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads,
                                      n_positions=128, eos_token_id=0, bos_token_id=0))
