"""Quality filters on crafted documents; MinHash against exact Jaccard; near-duplicate detection."""

from __future__ import annotations

import random

import numpy as np
import pytest

from jaxllm.data import quality as q

PROSE = ("The river changed its course in the early spring, and the village had to move the old bridge. "
         "Everyone in the town came to help with the work, and by the end of the summer it was done.")


def prose(seed: int, n_words: int = 120) -> str:
    """Distinct documents: random words from a 2,000-word made-up vocabulary with stop words mixed in."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(2000)]
    stop = ["the", "and", "of", "to", "with"]
    return " ".join(rng.choice(stop) if rng.random() < 0.3 else rng.choice(vocab) for _ in range(n_words)) + "."


def test_length():
    cfg = q.LengthConfig(min_chars=10, max_chars=50, min_words=3)
    assert q.length_ok("three small words", cfg)
    assert not q.length_ok("two words", cfg)  # 9 chars
    assert not q.length_ok("abcdefghijklmno pq", cfg)  # 2 words
    assert not q.length_ok("word " * 11, cfg)  # 55 chars


def test_blocklist_whole_words_case_insensitive_phrases_and_max_hits():
    pattern = q.compile_blocklist(q.BlocklistConfig(words=("spam", "buy now")), ("casino",))
    assert q.blocklist_ok("No problem here; spammer is a longer word.", pattern, 0)
    assert not q.blocklist_ok("Some SPAM inside.", pattern, 0)
    assert not q.blocklist_ok("Please buy   now!", pattern, 0)
    assert not q.blocklist_ok("the casino", pattern, 0)
    assert q.blocklist_ok("spam once", pattern, 1) and not q.blocklist_ok("spam, spam", pattern, 1)
    assert q.compile_blocklist(q.BlocklistConfig()) is None and q.blocklist_ok("spam", None, 0)


@pytest.mark.parametrize("text,why", [
    ("#### {{{ }}} <<< >>> | hello world " * 5, "symbols"),
    ("1234 5678 91011 121314 the and of " * 5, "non-letters"),
    ("a b c d e f g h i j k l m n o p " * 5, "short words"),
    ("supercalifragilistic extraordinarilylongwordness " * 5, "long words"),
    ("Click here to subscribe.\n" * 10 + PROSE, "repeated lines"),
    ("the cat sat on the mat " * 10, "repeated n-gram"),
])
def test_gibberish_rejects(text, why):
    assert not q.gibberish_ok(text, q.GibberishConfig()), why


def test_gibberish_keeps_prose():
    assert q.gibberish_ok(PROSE, q.GibberishConfig())
    assert q.gibberish_ok(prose(1), q.GibberishConfig())


def test_top_ngram_fraction_formula():
    ws = "a bb a bb a bb c".split()  # bigram (a, bb) x3: 3 * 3 chars / 10 chars
    assert q.top_ngram_fraction(ws, 2) == pytest.approx(9 / 10)
    assert q.top_ngram_fraction("x y z w".split(), 2) == 0.0  # no repeat


def test_language():
    cfg = q.LanguageConfig(min_stopwords=2, min_alpha_word_ratio=0.8)
    assert q.language_ok(PROSE, cfg)
    assert not q.language_ok("Der Fluss änderte im Frühling seinen Lauf und das Dorf baute", cfg)  # 0 stop words
    assert not q.language_ok("the and 1 2 3 4 5 6 7 8", cfg)  # 2 of 10 words alphabetic


def test_first_rejection_order_skip_and_disable():
    cfg = q.FilterConfig()
    assert q.first_rejection(PROSE, cfg, None) == ""
    assert q.first_rejection("ok", cfg, None) == "length"  # also gibberish/language, charged to the first
    code = "def f(x):\n    return {x: [x * 2 for _ in range(3)]}\n" * 3 + "print(f(1))"
    assert q.first_rejection(code, cfg, None) in ("gibberish", "language")
    assert q.first_rejection(code, cfg, None, skip=("gibberish", "language")) == ""
    off = q.FilterConfig(gibberish=q.GibberishConfig(enabled=False), language=q.LanguageConfig(enabled=False))
    assert q.first_rejection(code, off, None) == ""


def test_exact_key_normalises_case_and_whitespace():
    assert q.exact_key("Hello   World\n") == q.exact_key("hello world")
    assert q.exact_key("ﬁne day") == q.exact_key("fine day")  # NFKC ligature
    assert q.exact_key("hello world") != q.exact_key("hello world!")


def test_shingle_hashes_count_distinct_grams():
    text = "a b c a b c a b"  # 3-grams: abc bca cab abc bca cab -> 3 distinct
    assert len(q.shingle_hashes(text, 3)) == 3
    assert len(q.shingle_hashes("A  b", 5)) == 1 and len(q.shingle_hashes("", 5)) == 0
    np.testing.assert_array_equal(q.shingle_hashes("Hello  WORLD again", 2), q.shingle_hashes("hello world again", 2))


def _shingle_set(text: str, n: int) -> set[str]:
    ws = q.normalise(text).split()
    return {" ".join(ws[i:i + n]) for i in range(max(1, len(ws) - n + 1))}


def test_minhash_estimates_jaccard():
    """|estimate - exact Jaccard| <= 0.15 with 256 permutations (std <= 0.032; ~4.7 sigma), fixed seed."""
    a, b = q.permutations(256, seed=0)
    base = prose(0, 300).split()
    for keep in (1.0, 0.9, 0.7, 0.4, 0.0):
        other = base[: int(len(base) * keep)] + prose(7, 300).split()[int(len(base) * keep):]
        t1, t2 = " ".join(base), " ".join(other)
        s1, s2 = _shingle_set(t1, 5), _shingle_set(t2, 5)
        exact = len(s1 & s2) / len(s1 | s2)
        est = q.estimated_jaccard(q.minhash(q.shingle_hashes(t1, 5), a, b), q.minhash(q.shingle_hashes(t2, 5), a, b))
        assert abs(est - exact) <= 0.15, (keep, est, exact)


def test_minhash_matches_a_plain_loop():
    a, b = q.permutations(16, seed=3)
    h = q.shingle_hashes(prose(2, 50), 3)
    expected = [min(((int(ai) * int(x) + int(bi)) % (1 << 64)) >> 32 for x in h) for ai, bi in zip(a, b)]
    np.testing.assert_array_equal(q.minhash(h, a, b, chunk=7), np.array(expected, np.uint32))


def test_lsh_bands_midpoint_near_threshold():
    bands, rows = q.lsh_bands(0.8, 128)
    assert bands * rows <= 128 and abs((1 / bands) ** (1 / rows) - 0.7) < 0.05


def test_near_dup_finds_light_edit_and_keeps_distinct():
    cfg = q.DedupConfig(threshold=0.8)
    perms = q.permutations(cfg.num_perm, cfg.seed)
    index = q.new_index(cfg)

    def is_dup(text):
        return q.check_and_add(index, q.minhash(q.shingle_hashes(text, cfg.ngram), *perms))

    originals = [prose(i, 400) for i in range(30)]
    assert not any(is_dup(t) for t in originals)  # distinct documents all kept
    words = originals[5].split()
    words[100] = "changed"
    words[250] = "edited"
    assert is_dup(" ".join(words))  # two words changed of 400
    assert is_dup(originals[9].upper())  # normalised
    assert not is_dup(prose(100, 400))
    assert len(index.signatures) == 31
