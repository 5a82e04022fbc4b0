"""A character-level causal LM on tiny-shakespeare and generative-unlearning measures, usable without Flower.

Modules: `model` (GPTConfig, GPT, generate), `tokenizer` (CharTokenizer), `corpus` (tiny-shakespeare lookup,
train/val split, speaker partitioner), `train` (train_lm, evaluate), `memorization` (forget sets, extraction,
memorization/difficulty, forget quality, gradient-ascent traces). Importing this package imports nothing heavy
beyond torch and has no side effects.
"""
