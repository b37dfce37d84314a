"""The incremental detokenizer against decoding everything at every token: the same pieces, the
same cut at the first stop string, on a byte-level BPE (GPT-2, SmolLM2) and on a SentencePiece-
style vocabulary with byte fallback and a stripped leading space (Llama 2, Mistral)."""

import numpy as np
import pytest

from llmc.runtime.text import TextStream


def full_decode_pieces(decode, tokens, stops):
    """The oracle (for outputs that are valid UTF-8): decode every token so far at every step; hold back an incomplete UTF-8 sequence
    and a tail that could still grow into a stop string; cut at the first stop string."""
    hold = max((len(s) - 1 for s in stops), default=0)
    pieces, emitted = [], 0
    for n in range(1, len(tokens) + 1):
        text = decode(tokens[:n])
        if text.endswith("\ufffd"):
            continue
        cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
        if cuts:
            pieces.append(text[emitted:min(cuts)])
            return pieces, True
        ready = len(text) - hold
        if ready > emitted:
            pieces.append(text[emitted:ready])
            emitted = ready
    pieces.append(decode(tokens)[emitted:])
    return pieces, False


def byte_level():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ã", "©")]       # " the", "é" as one token
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece_like():
    from tokenizers import Tokenizer, decoders, models

    pieces = ["<unk>", "▁", "▁the", "▁a", "a", "b", "c", ".", "ab", "▁ab", "\n"]
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], byte_fallback=True,
                               unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


class Decoder:
    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=True)


@pytest.mark.parametrize("make", [byte_level, sentencepiece_like])
def test_pieces_equal_decoding_everything_at_every_token(make):
    tok = Decoder(make())
    vocab = tok.tok.get_vocab_size()
    rng = np.random.default_rng(7)
    ordinary = [t for t in range(vocab) if tok.decode([t]) not in ("", "\ufffd")]
    chars = ["é", "ü", "中", "😀", "—", "ß"]           # 2 to 4 UTF-8 bytes, one token each or several
    stopped_somewhere = 0
    for trial in range(300):
        tokens = []
        while len(tokens) < int(rng.integers(1, 40)):
            if rng.random() < 0.3:
                tokens += tok.tok.encode(str(rng.choice(chars))).ids
            else:
                tokens.append(int(rng.choice(ordinary)))
        stops = []
        if trial % 2:
            text = tok.decode(tokens)
            at = int(rng.integers(max(1, len(text))))
            stops = [s for s in (text[at:at + int(rng.integers(1, 4))], "zz") if s]
        want, want_stopped = full_decode_pieces(tok.decode, tokens, stops)
        stream = TextStream(tok, stops)
        got = []
        for t in tokens:
            got.append(stream.push(t))
            if stream.stopped:
                break
        if not stream.stopped:
            got.append(stream.finish())
        assert stream.stopped == want_stopped
        assert [p for p in got if p] == [p for p in want if p], (tokens, stops)
        stopped_somewhere += want_stopped
    assert stopped_somewhere > 50


def test_work_per_token_does_not_grow_with_the_output():
    """Each push decodes a window of a few tokens, not everything so far."""
    tok = Decoder(byte_level())
    sizes = []

    class Counting:
        def decode(self, ids):
            sizes.append(len(ids))
            return tok.decode(ids)

    stream = TextStream(Counting(), ["never there"])
    for t in np.random.default_rng(1).integers(65, 90, 5000).tolist():
        stream.push(t)
    assert max(sizes) <= 4 and len(stream.tokens) <= 4       # nor does what it keeps
