"""Train the toy seq2seq model shipped in `digit-reverser/`: a 2-layer BART that reverses a string of digits.

Its answer is known, so its cross-attention is too: to write the i-th output digit the decoder must read
the i-th digit from the end of the source, so its cross-attention is anti-diagonal. `tests/test_sites.py`
checks that on the shipped weights. Run `python examples/toy_models/train_digit_reverser.py` to train it
again (about a minute on two CPU cores, fixed seed).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BartConfig, BartForConditionalGeneration

PAD, BOS, EOS, FIRST_DIGIT = 0, 1, 2, 3
VOCAB = FIRST_DIGIT + 10
OUT = Path(__file__).parent / "digit-reverser"


def tokens(digits: str) -> list[int]:
    return [FIRST_DIGIT + int(d) for d in digits]


def digit_tokenizer():
    """The toy's tokenizer, saved beside its weights: one token per digit (spaces ignored), the source ending
    with </s> as in training; ids PAD, BOS, EOS, then the digits."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", *"0123456789"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                      pre_tokenizers.Split(Regex(r"\d"), behavior="isolated")])
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def batch(generator: torch.Generator, size: int, low: int = 4, high: int = 10):
    """(source ids, decoder input ids, labels): source `d1..dn EOS`, target `BOS dn..d1 EOS`, padded."""
    lengths = torch.randint(low, high + 1, (size,), generator=generator)
    width = int(lengths.max())
    source = torch.full((size, width + 1), PAD)
    target = torch.full((size, width + 2), PAD)
    for row, n in enumerate(lengths.tolist()):
        digits = torch.randint(0, 10, (n,), generator=generator) + FIRST_DIGIT
        source[row, : n + 1] = torch.cat([digits, torch.tensor([EOS])])
        target[row, : n + 2] = torch.cat([torch.tensor([BOS]), digits.flip(0), torch.tensor([EOS])])
    labels = target[:, 1:].masked_fill(target[:, 1:] == PAD, -100)
    return source, target[:, :-1], labels


def config() -> BartConfig:
    return BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
                      pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=BOS,
                      forced_eos_token_id=None, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)


def train(steps: int = 1500, seed: int = 0) -> BartForConditionalGeneration:
    torch.manual_seed(seed)
    model = BartForConditionalGeneration(config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        source, decoder_input, labels = batch(generator, 64)
        loss = model(input_ids=source, attention_mask=source != PAD, decoder_input_ids=decoder_input, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 250 == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    return model.eval()


if __name__ == "__main__":
    model = train()
    model.save_pretrained(OUT)
    digit_tokenizer().save_pretrained(OUT)
    print(f"saved {OUT}")
