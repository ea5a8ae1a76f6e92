"""Parity of distill's C tokenizer with HF `tokenizers` (the oracle), for SmolLM2 (the teacher GGUF) and a
Llama-3 vocabulary (llama.cpp's models/ggml-vocab-llama-bpe.gguf, shipped in the llama-cpp-python sdist).

The oracle tokenizer.json is built from the GGUF by scripts/make-tokenizer-json. That the oracle itself
behaves like the real HF tokenizers is checked against llama.cpp's reference outputs (models/*.gguf.inp/.out,
which llama.cpp generated with HF tokenizers from the original tokenizer.json files): Llama-3, StarCoder
(the same Digits+ByteLevel pre-tokenizer as SmolLM2) and GPT-2.

Benchmark (not a test): DISTILL_BENCH=1 pytest -s tests/py/test_tokenizer_parity.py -k bench
"""
import glob
import json
import os
import random
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("DISTILL_BIN", os.path.join(ROOT, "build", "distill"))
TEACHER = os.path.join(ROOT, "checkpoints", "teachers", "SmolLM2-135M-Instruct.Q4_1.gguf")
CORPUS = sorted(glob.glob(os.path.join(ROOT, "tests", "data", "corpus", "*.txt")))
CACHE = os.path.expanduser(os.environ.get("DISTILL_CACHE", "~/.cache/distill"))
LLAMACPP_SDIST = "llama_cpp_python-0.3.36"
MODELS = f"{LLAMACPP_SDIST}/vendor/llama.cpp/models"

tokenizers = pytest.importorskip("tokenizers")


def run(args, **kw):
    r = subprocess.run([BIN] + args, capture_output=True, **kw)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r


def llamacpp_models():
    """Directory with llama.cpp's vocab GGUFs and reference files, fetched from PyPI (sdist) once."""
    d = os.path.join(CACHE, "llamacpp")
    want = ["ggml-vocab-llama-bpe.gguf", "ggml-vocab-starcoder.gguf", "ggml-vocab-gpt-2.gguf"]
    members = [f"{MODELS}/{w}{ext}" for w in want for ext in ("", ".inp", ".out")]
    if all(os.path.exists(os.path.join(d, m)) for m in members):
        return os.path.join(d, MODELS)
    os.makedirs(d, exist_ok=True)
    sdist = os.path.join(d, LLAMACPP_SDIST + ".tar.gz")
    if not os.path.exists(sdist):
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "llama-cpp-python==0.3.36", "-d", d], capture_output=True, timeout=600)
        if r.returncode != 0 or not os.path.exists(sdist):
            pytest.skip("cannot download the llama-cpp-python sdist from PyPI (needed for the Llama-3 vocab): "
                        + r.stderr.decode(errors="replace")[-300:])
    with tarfile.open(sdist) as tf:
        for m in members:
            tf.extract(m, d)
    return os.path.join(d, MODELS)


_ORACLES = {}


def oracle_json(gguf, out_dir):
    """tokenizer.json built from gguf (once per session)."""
    if gguf not in _ORACLES:
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make-tokenizer-json"), gguf, str(out_dir)],
                       check=True)
        _ORACLES[gguf] = os.path.join(str(out_dir), "tokenizer.json")
    return _ORACLES[gguf]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    if not os.path.exists(TEACHER):
        pytest.fail(f"{TEACHER} missing: run scripts/fetch-teacher")
    d = tmp_path_factory.mktemp("smol")
    js = oracle_json(TEACHER, d)
    return {"gguf": TEACHER, "json": js, "hf": tokenizers.Tokenizer.from_file(js)}


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    gguf = os.path.join(llamacpp_models(), "ggml-vocab-llama-bpe.gguf")
    d = tmp_path_factory.mktemp("llama3")
    js = oracle_json(gguf, d)
    return {"gguf": gguf, "json": js, "hf": tokenizers.Tokenizer.from_file(js)}


def our_ids(tok, path, special=False):
    args = ["tokenize", "--tokenizer", tok, "--ids", path] + (["--special"] if special else [])
    return [int(x) for x in run(args).stdout.split()]


def first_diff(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def assert_same(ours, ref, what, hf=None):
    if ours != ref:
        i = first_diff(ours, ref)
        ctx = ""
        if hf is not None:
            ctx = f" ours {[hf.id_to_token(x) for x in ours[max(0, i - 3):i + 4]]}" \
                  f" hf {[hf.id_to_token(x) for x in ref[max(0, i - 3):i + 4]]}"
        pytest.fail(f"{what}: first difference at token {i} (ours {len(ours)} ids, HF {len(ref)}){ctx}")


def read_cases(models, name):
    with open(os.path.join(models, f"ggml-vocab-{name}.gguf.inp"), encoding="utf-8", newline="") as f:
        inp = f.read().split("\n__ggml_vocab_test__\n")
    with open(os.path.join(models, f"ggml-vocab-{name}.gguf.out"), encoding="utf-8") as f:
        out = [[int(x) for x in line.split()] for line in f.read().split("\n")]
    return list(zip(inp, out))


def batch_ids(tok, texts, tmp_path, name):
    """Our ids of many texts with one process: a JSONL shard, one doc per text (no separator)."""
    import h5py
    src = tmp_path / f"{name}.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    out = tmp_path / f"{name}.h5"
    run(["tokenize", "--tokenizer", tok, "--out", str(out), "--format", "jsonl", "--no-doc-sep",
         "--on-error", "fail", str(src)])
    with h5py.File(out, "r") as h:
        toks, offs = h["tokens"][:], h["doc_offsets"][:]
    return [toks[offs[i]:offs[i + 1]].tolist() for i in range(len(texts))]


# ---- the oracle is the real thing: llama.cpp's HF-generated reference ids
@pytest.mark.parametrize("name", ["llama-bpe", "starcoder", "gpt-2"])
def test_reference_outputs(name, tmp_path):
    models = llamacpp_models()
    gguf = os.path.join(models, f"ggml-vocab-{name}.gguf")
    cases = [(x, y) for x, y in read_cases(models, name) if x]
    hf = tokenizers.Tokenizer.from_file(oracle_json(gguf, tmp_path))
    for text, ref in cases:  # our oracle reproduces HF's original outputs
        assert hf.encode(text, add_special_tokens=False).ids == ref, repr(text)
    ours = batch_ids(gguf, [x for x, _ in cases], tmp_path, name)
    for (text, ref), got in zip(cases, ours):
        assert got == ref, repr(text)


# ---- corpus parity
@pytest.mark.parametrize("path", CORPUS, ids=[os.path.basename(p) for p in CORPUS])
def test_corpus_smollm2(smol, path):
    text = open(path, encoding="utf-8", newline="").read()
    ref = smol["hf"].encode(text, add_special_tokens=False).ids
    assert_same(our_ids(smol["gguf"], path), ref, f"SmolLM2 GGUF {path}", smol["hf"])
    assert_same(our_ids(smol["json"], path), ref, f"SmolLM2 tokenizer.json {path}", smol["hf"])


@pytest.mark.parametrize("path", CORPUS, ids=[os.path.basename(p) for p in CORPUS])
def test_corpus_llama3(llama3, path):
    text = open(path, encoding="utf-8", newline="").read()
    ref = llama3["hf"].encode(text, add_special_tokens=False).ids
    assert_same(our_ids(llama3["gguf"], path), ref, f"Llama-3 GGUF {path}", llama3["hf"])
    assert_same(our_ids(llama3["json"], path), ref, f"Llama-3 tokenizer.json {path}", llama3["hf"])


@pytest.mark.parametrize("name", ["smol", "llama3"])
def test_roundtrip(name, request, tmp_path):
    """decode(encode(x)) == x over the whole corpus, in one process per tokenizer (ids of all files, in order)."""
    tok = request.getfixturevalue(name)
    texts = [open(p, "rb").read() for p in CORPUS]
    docs = batch_ids(tok["gguf"], [t.decode() for t in texts], tmp_path, name)
    ids = [x for d in docs for x in d]
    idf = tmp_path / "ids.txt"
    idf.write_text(" ".join(map(str, ids)))
    back = run(["tokenize", "--tokenizer", tok["gguf"], "--decode", str(idf)]).stdout
    assert back == b"".join(texts), name
    for d, t in zip(docs, texts):  # and HF decodes our ids of each file to the same bytes
        assert tok["hf"].decode(d, skip_special_tokens=False).encode() == t


def random_texts(seed, n):
    """Random mixtures of the character classes the pre-tokenizers treat differently."""
    rng = random.Random(seed)
    pools = [
        "abcXYZ", "éüßñ", "'s't're've'm'll'd", "0123456789", "٣٤٥", "½²", " ", "  ", "\t", "\n", "\r\n", "\u00a0",
        "\u3000", ".,;:!?-_()[]{}\"'`~@#$%^&*+=<>/\\|", "中文字", "カタカナ", "한국", "Привет", "مرحبا", "🦙", "👨‍👩‍👧",
        "🏳️‍🌈", "e\u0301", "\u200b", "ǅ", "ΣΑΣ", "ſ", "İ", "\u2028", "\x0b\x0c",
    ]
    out = []
    for _ in range(n):
        k = rng.randint(1, 24)
        out.append("".join(rng.choice(rng.choice(pools)) * rng.choice([1, 1, 1, 2, 5]) for _ in range(k)))
    return out


@pytest.mark.parametrize("name", ["smol", "llama3"])
def test_random_strings(name, request, tmp_path):
    tok = request.getfixturevalue(name)
    texts = random_texts(1234, 400)
    ours = batch_ids(tok["gguf"], texts, tmp_path, name)
    bad = [t for t, got in zip(texts, ours) if got != tok["hf"].encode(t, add_special_tokens=False).ids]
    assert not bad, f"{name}: {len(bad)} of {len(texts)} differ, e.g. {bad[:3]!r}"


def test_special_tokens(smol, tmp_path):
    p = tmp_path / "sp.txt"
    text = "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>x<|im_start|>"
    p.write_text(text)
    assert our_ids(smol["gguf"], str(p), special=True) == smol["hf"].encode(text, add_special_tokens=False).ids
    assert 1 not in our_ids(smol["gguf"], str(p))  # without --special the markers are plain text
    # an HF model directory (tokenizer.json + tokenizer_config.json) works the same as the GGUF
    d = os.path.dirname(smol["json"])
    assert our_ids(d, str(p), special=True) == our_ids(smol["gguf"], str(p), special=True)


# ---- chat templates: HF renders the template string (Jinja) and tokenizes with special tokens
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris is the capital of France."}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "  Colour of the sky?\n"},
     {"role": "assistant", "content": "\nBlue."}, {"role": "user", "content": "And grass?"},
     {"role": "assistant", "content": "Green 🌱, 100%!"}],
    [{"role": "user", "content": "Écris 3 mots: 中文, тест, عربى"}, {"role": "assistant", "content": " leading space\tand tab"}],
    [{"role": "user", "content": "\u00a0\u3000unicode spaces\u2003\x1c"}, {"role": "assistant", "content": "\u200bzero width\u0085"}],
]


def render(template, msgs, bos=""):
    import jinja2
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=msgs, add_generation_prompt=False, bos_token=bos)


@pytest.mark.parametrize("which", ["smol", "llama3"])
def test_chat_template(which, request, tmp_path):
    import h5py
    tok = request.getfixturevalue(which)
    if which == "smol":  # the GGUF's own template (copied into tokenizer_config.json by the oracle script)
        with open(os.path.join(os.path.dirname(tok["json"]), "tokenizer_config.json"), encoding="utf-8") as f:
            template = json.load(f)["chat_template"]
        assert "<|im_start|>" in template
        bos = ""
    else:
        template, bos = LLAMA3_TEMPLATE, "<|begin_of_text|>"
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS), encoding="utf-8")
    out = tmp_path / "chat.h5"
    run(["tokenize", "--tokenizer", tok["gguf"], "--out", str(out), "--format", "chat", "--on-error", "fail",
         "--chat-template", "chatml" if which == "smol" else "llama3", str(src)])
    with h5py.File(out, "r") as h:
        toks, mask, offs = h["tokens"][:], h["loss_mask"][:], h["doc_offsets"][:]
        assert h.attrs["chat_family"] == (b"chatml" if which == "smol" else b"llama3")
    for i, msgs in enumerate(CHATS):
        ref = tok["hf"].encode(render(template, msgs, bos), add_special_tokens=False).ids
        got = toks[offs[i]:offs[i + 1]].tolist()
        assert_same(got, ref, f"{which} chat {i}", tok["hf"])
        # the masked tokens are the assistant turns (content + end-of-turn), in order
        m = mask[offs[i]:offs[i + 1]].astype(bool)
        masked = tok["hf"].decode([t for t, k in zip(got, m) if k], skip_special_tokens=False)
        end = "<|im_end|>" if which == "smol" else "<|eot_id|>"
        want = "".join((x["content"] if which == "smol" else x["content"].strip()) + end
                       for x in msgs if x["role"] == "assistant")
        assert masked == want


def test_shard_h5py(smol, tmp_path):
    import h5py
    out = tmp_path / "corpus.h5"
    run(["tokenize", "--tokenizer", smol["gguf"], "--out", str(out), "--seq-len", "64"] + CORPUS)
    with h5py.File(out, "r") as h:
        assert h.attrs["format"] == b"distill-tokens" and h.attrs["format_version"] == 1
        assert h.attrs["n_docs"] == len(CORPUS) and h.attrs["seq_len"] == 64
        for name in ("tokens", "loss_mask", "doc_offsets", "packed/tokens", "packed/reset", "packed/loss_mask"):
            assert h[name].chunks is not None and h[name].compression == "gzip", name
        assert h["tokens"].dtype == "uint32"
        toks, offs = h["tokens"][:], h["doc_offsets"][:]
        rows = h["packed/tokens"][:]
        assert rows.shape[1] == 65
        # rows overlap by one token and together are the stream
        stream = rows[:, :64].reshape(-1)
        n = int(h.attrs["n_tokens"])
        assert (stream[:n] == toks[:n]).all()
        sep = smol["hf"].token_to_id("<|endoftext|>")
        for i, path in enumerate(CORPUS):
            ref = smol["hf"].encode(open(path, encoding="utf-8", newline="").read(), add_special_tokens=False).ids
            assert toks[offs[i]:offs[i + 1]].tolist() == ref + [sep]
        assert int(h.attrs["tokenizer_hash"]) != 0
    # the tokenizer hash is the same whether the tokenizer came from the GGUF or from tokenizer.json
    info = json.loads(run(["tokenize", "--info", str(out), "--tokenizer", smol["json"]]).stdout)
    assert info["n_docs"] == len(CORPUS) and info["kind"] == "lm"


def test_bad_input_cli(smol, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"text": "ok"}\n{oops\n{"text": "\xff"}\n')
    r = subprocess.run([BIN, "tokenize", "--tokenizer", smol["gguf"], "--out", str(tmp_path / "x.h5"),
                        "--on-error", "fail", str(src)], capture_output=True)
    assert r.returncode == 3 and f"{src}:2:".encode() in r.stderr
    assert not os.path.exists(tmp_path / "x.h5")
    r = subprocess.run([BIN, "tokenize", "--tokenizer", smol["gguf"], "--out", str(tmp_path / "y.h5"), str(src)],
                       capture_output=True)
    assert r.returncode == 0 and f"{src}:3: invalid UTF-8".encode() in r.stderr
    r = subprocess.run([BIN, "tokenize", "--tokenizer", str(tmp_path / "nope.gguf"), "--ids", str(src)],
                       capture_output=True)
    assert r.returncode == 3 and b"nope.gguf" in r.stderr


def test_unsupported_vocab(tmp_path):
    """A SentencePiece GGUF vocabulary (Llama-2) is refused with a clear message, not mis-tokenized."""
    models = llamacpp_models()
    spm = os.path.join(models, "ggml-vocab-llama-spm.gguf")
    if not os.path.exists(spm):
        sdist = os.path.join(CACHE, "llamacpp", LLAMACPP_SDIST + ".tar.gz")
        with tarfile.open(sdist) as tf:
            tf.extract(f"{MODELS}/ggml-vocab-llama-spm.gguf", os.path.join(CACHE, "llamacpp"))
    p = tmp_path / "x.txt"
    p.write_text("hello")
    r = subprocess.run([BIN, "tokenize", "--tokenizer", spm, "--ids", str(p)], capture_output=True)
    assert r.returncode == 3 and b"only byte-level BPE" in r.stderr


@pytest.mark.skipif(os.environ.get("DISTILL_BENCH") != "1", reason="benchmark: set DISTILL_BENCH=1")
def test_bench_encode(smol, llama3, tmp_path):
    """Single-threaded encode throughput, ours vs HF tokenizers, on the corpus repeated (one doc per file)."""
    import time
    reps = int(os.environ.get("DISTILL_BENCH_REPS", "200"))
    docs = [open(p, encoding="utf-8", newline="").read() for p in CORPUS] * reps
    files = []
    for i, p in enumerate(CORPUS):  # our bench reads files: one big file per corpus file, same bytes in total
        f = tmp_path / f"c{i}.txt"
        f.write_text(open(p, encoding="utf-8", newline="").read() * reps, encoding="utf-8", newline="")
        files.append(str(f))
    nbytes = sum(len(d.encode()) for d in docs)
    os.environ["RAYON_NUM_THREADS"] = "1"
    for tok, name in ((smol, "SmolLM2"), (llama3, "Llama-3")):
        hf = tok["hf"]
        best = 1e9
        for _ in range(3):
            t0 = time.perf_counter()
            for d in docs:
                hf.encode(d, add_special_tokens=False)
            best = min(best, time.perf_counter() - t0)
        r = json.loads(run(["tokenize", "--tokenizer", tok["gguf"], "--bench", "--repeat", "3"] + files).stdout)
        print(f"\n{name}: ours {r['MB_per_s']:.2f} MB/s, HF tokenizers {nbytes / best / 1e6:.2f} MB/s "
              f"(per-document encode, 1 thread), ratio {r['MB_per_s'] / (nbytes / best / 1e6):.1f}x, {nbytes} bytes")
