"""Writes the GGUF seed corpus for fuzz_gguf: python tests/fuzz/make_gguf_seeds.py OUT_DIR (needs gguf, numpy)."""
import numpy as np, gguf, sys
from gguf import GGUFWriter, GGMLQuantizationType as T
out = sys.argv[1]
rng = np.random.default_rng(0)
def w(name, fn):
    wr = GGUFWriter(f"{out}/{name}.gguf", "llama")
    fn(wr)
    wr.write_header_to_file(); wr.write_kv_data_to_file(); wr.write_tensors_to_file(); wr.close()
def teacherlike(wr):
    wr.add_block_count(2); wr.add_context_length(64); wr.add_embedding_length(64); wr.add_feed_forward_length(96)
    wr.add_head_count(4); wr.add_head_count_kv(2); wr.add_rope_freq_base(10000.0); wr.add_layer_norm_rms_eps(1e-5)
    wr.add_rope_dimension_count(16); wr.add_tokenizer_model("gpt2")
    wr.add_token_list(["<a>", "b", "c", "d"]); wr.add_token_types([3, 1, 1, 1]); wr.add_bos_token_id(0); wr.add_eos_token_id(1)
    wr.add_array("test.nested", [[1, 2], [3]]); wr.add_bool("test.b", True); wr.add_float64("test.f", 1.5)
    wr.add_tensor("token_embd.weight", rng.standard_normal((4, 64)).astype(np.float32))
    wr.add_tensor("output_norm.weight", np.ones(64, np.float32))
    q = gguf.quants.quantize(rng.standard_normal((8, 64)).astype(np.float32), T.Q8_0)
    wr.add_tensor("blk.0.attn_q.weight", q, raw_shape=q.shape, raw_dtype=T.Q8_0)
    q = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), T.Q4_1)
    wr.add_tensor("blk.0.attn_k.weight", q, raw_shape=q.shape, raw_dtype=T.Q4_1)
w("teacherlike", teacherlike)
def kq(wr):
    for t in (T.Q4_K, T.Q5_K, T.Q6_K):
        nb = gguf.GGML_QUANT_SIZES[t][1]
        raw = rng.integers(0, 256, size=(1, nb), dtype=np.uint8)
        raw[:, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # sane d
        wr.add_tensor(f"k.{t.name}", raw, raw_shape=(1, nb), raw_dtype=t)
    wr.add_tensor("h", np.arange(32, dtype=np.float16)); 
w("kquants", kq)
def meta(wr):
    wr.add_uint8("a.u8", 7); wr.add_int8("a.i8", -7); wr.add_uint16("a.u16", 700); wr.add_int16("a.i16", -700)
    wr.add_uint32("a.u32", 70000); wr.add_int32("a.i32", -70000); wr.add_float32("a.f32", 0.5); wr.add_uint64("a.u64", 1 << 40)
    wr.add_int64("a.i64", -(1 << 40)); wr.add_float64("a.f64", 0.25); wr.add_string("a.s", "héllo"); wr.add_array("a.arr", [1.0, 2.0])
    wr.add_array("a.sarr", ["x", "yy"]); wr.add_uint32("general.alignment", 64)
w("meta", meta)
