#!/usr/bin/python3
"""The `nibble` command end to end: what a user types, on the real stories260K model.

Expectations come from the golden files of the independent numpy reference
(tests/golden, tests/reference), never from nibble's own earlier output.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

NIBBLE = os.environ["NIBBLE_BIN"]
SHARED = os.environ["NIBBLE_SHARED_DIR"]
MODELS = os.environ["NIBBLE_TEST_MODELS"]
GOLDEN = os.environ["NIBBLE_GOLDEN_DIR"]
STORIES = os.path.join(SHARED, "models", "stories260K")
MODEL = os.path.join(MODELS, "stories260K")
SAMPLE = os.path.join(SHARED, "datasets", "tinystories", "sample.txt")
REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference", "reference.py")


def nibble(*args, check=True):
    result = subprocess.run([NIBBLE, *args], capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"nibble {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def golden(name):
    with open(os.path.join(GOLDEN, name)) as f:
        return json.load(f)


def generate_json(*args):
    return json.loads(nibble("generate", "--model", MODEL, "--json", *args).stdout)


class GenerateTest(unittest.TestCase):
    def test_greedy_from_bos_matches_reference(self):
        out = generate_json("--max-tokens", "200", "--ignore-eos")
        expected = golden("stories260K_greedy200.json")
        self.assertEqual(out["prompt_ids"], [1])  # empty prompt: BOS alone
        self.assertEqual(out["generated_ids"], expected["ids"])
        self.assertEqual(out["text"], expected["text"])
        self.assertEqual(out["finish_reason"], "length")

    def test_streams_text_to_the_terminal(self):
        out = nibble("generate", "--model", MODEL, "--max-tokens", "30")
        self.assertTrue(out.stdout.startswith("Once upon a time, there was a little girl named Lily."),
                        out.stdout)
        self.assertIn("tokens/s", out.stderr)

    def test_prompt_is_bos_then_its_tokens(self):
        prompt = "The little dog saw 3 big cats, and ran home."
        with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
            f.write(prompt)
            f.flush()
            reference = subprocess.run(
                [sys.executable, REFERENCE, "tokenize", "--tokenizer",
                 os.path.join(STORIES, "tok512.bin"), "--text-file", f.name],
                capture_output=True, text=True, check=True, timeout=60)
        expected = json.loads(reference.stdout)["ids"]  # llama2.c's encoder, BOS first
        out = generate_json("--prompt", prompt, "--max-tokens", "1")
        self.assertEqual(out["prompt_ids"], expected)

    def test_sampling_is_seeded_and_reproducible(self):
        args = ["--temperature", "1.0", "--top-p", "0.9", "--top-k", "40", "--max-tokens", "60"]
        a = generate_json(*args, "--seed", "7")
        b = generate_json(*args, "--seed", "7")
        c = generate_json(*args, "--seed", "8")
        self.assertEqual(a["generated_ids"], b["generated_ids"])
        self.assertNotEqual(a["generated_ids"], c["generated_ids"])

    def test_sampled_story_ends_where_llama2c_ends_it(self):
        # llama2.c's models close a story with BOS (id 1), and its run.c stops there; so does
        # nibble on the converted model (without --ignore-eos). Seed 2 ends at token 230.
        ended = generate_json("--max-tokens", "480", "--temperature", "1.0", "--seed", "2")
        self.assertEqual(ended["finish_reason"], "stop")
        self.assertEqual(ended["generated_ids"][-1], 1)
        self.assertNotIn(1, ended["generated_ids"][:-1])
        endless = generate_json("--max-tokens", "480", "--temperature", "1.0", "--seed", "2",
                                "--ignore-eos")
        self.assertEqual(endless["generated_ids"][:len(ended["generated_ids"])],
                         ended["generated_ids"])
        self.assertEqual(len(endless["generated_ids"]), 480)

    def test_stop_string_ends_the_text_before_it(self):
        out = generate_json("--max-tokens", "200", "--stop", "park")
        self.assertEqual(out["finish_reason"], "stop_string")
        self.assertEqual(out["text"], "Once upon a time, there was a little girl named Lily. "
                                      "She loved to play outside in the ")

    def test_repetition_penalty_changes_greedy_output(self):
        plain = generate_json("--max-tokens", "80")
        penalized = generate_json("--max-tokens", "80", "--repetition-penalty", "1.3")
        self.assertNotEqual(plain["generated_ids"], penalized["generated_ids"])

    def test_bad_sampling_values_are_named(self):
        for flag, value, word in [("--temperature", "-1", "temperature"),
                                  ("--top-p", "0", "top_p"),
                                  ("--top-k", "-3", "top_k"),
                                  ("--repetition-penalty", "0", "repetition_penalty")]:
            out = nibble("generate", "--model", MODEL, flag, value, check=False)
            self.assertNotEqual(out.returncode, 0)
            self.assertIn(word, out.stderr)

    def test_missing_model_directory_is_named(self):
        out = nibble("generate", "--model", "/nonexistent/model", check=False)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("/nonexistent/model", out.stderr)

    def test_float16_weights_generate_the_same_story_start(self):
        out = generate_json("--max-tokens", "20", "--dtype", "float16")
        self.assertTrue(out["text"].startswith("Once upon a time, there was a little girl"), out["text"])


class PerplexityTest(unittest.TestCase):
    def test_matches_reference(self):
        for seqlen, name in [(128, "stories260K_tinystories_sample_ppl.json"),
                             (512, "stories260K_tinystories_sample_ppl512.json")]:
            out = json.loads(nibble("perplexity", "--model", MODEL, "--dataset", SAMPLE,
                                    "--seqlen", str(seqlen), "--json").stdout)
            expected = golden(name)
            self.assertEqual(out["tokens"], expected["tokens"])
            self.assertEqual(out["windows"], expected["windows"])
            self.assertAlmostEqual(out["perplexity"] / expected["perplexity"], 1.0, delta=1e-4)

    def test_float16_perplexity_is_close(self):
        out = json.loads(nibble("perplexity", "--model", MODEL, "--dataset", SAMPLE,
                                "--seqlen", "128", "--json", "--dtype", "float16").stdout)
        expected = golden("stories260K_tinystories_sample_ppl.json")["perplexity"]
        self.assertAlmostEqual(out["perplexity"] / expected, 1.0, delta=5e-3)

    def test_window_longer_than_context_is_refused(self):
        out = nibble("perplexity", "--model", MODEL, "--dataset", SAMPLE, "--seqlen", "1024",
                     check=False)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("context", out.stderr)

    def test_text_shorter_than_a_window_is_refused(self):
        with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
            f.write("Once upon a time.")
            f.flush()
            out = nibble("perplexity", "--model", MODEL, "--dataset", f.name, "--seqlen", "128",
                         check=False)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("fewer than one window", out.stderr)

    def test_missing_dataset_is_named(self):
        out = nibble("perplexity", "--model", MODEL, "--dataset", "/nonexistent.txt", check=False)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("/nonexistent.txt", out.stderr)


class ConvertTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()

    def tearDown(self):
        shutil.rmtree(self.tmp)

    def test_llama2c_tokenizer_bin_converts_to_an_equivalent_model(self):
        out_dir = os.path.join(self.tmp, "from_bin")
        nibble("convert", "llama2c", "--checkpoint", os.path.join(STORIES, "stories260K.bin"),
               "--tokenizer", os.path.join(STORIES, "tok512.bin"), "--out", out_dir)
        out = json.loads(nibble("generate", "--model", out_dir, "--json", "--max-tokens", "200",
                                "--ignore-eos").stdout)
        self.assertEqual(out["generated_ids"], golden("stories260K_greedy200.json")["ids"])
        ppl = json.loads(nibble("perplexity", "--model", out_dir, "--dataset", SAMPLE,
                                "--seqlen", "128", "--json").stdout)
        self.assertEqual(ppl["tokens"], golden("stories260K_tinystories_sample_ppl.json")["tokens"])

    def test_existing_output_directory_is_refused(self):
        out = nibble("convert", "llama2c", "--checkpoint", os.path.join(STORIES, "stories260K.bin"),
                     "--tokenizer", os.path.join(STORIES, "tok512.model"), "--out", MODEL,
                     check=False)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("not empty", out.stderr)

    def test_truncated_checkpoint_is_named_and_nothing_is_written(self):
        truncated = os.path.join(self.tmp, "truncated.bin")
        with open(os.path.join(STORIES, "stories260K.bin"), "rb") as f:
            data = f.read()
        with open(truncated, "wb") as f:
            f.write(data[: len(data) - 100])
        out_dir = os.path.join(self.tmp, "out")
        out = nibble("convert", "llama2c", "--checkpoint", truncated,
                     "--tokenizer", os.path.join(STORIES, "tok512.model"), "--out", out_dir,
                     check=False)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn(truncated, out.stderr)
        self.assertFalse(os.path.exists(out_dir))
        self.assertEqual(sorted(os.listdir(self.tmp)), ["truncated.bin"])  # no staging left


class QuantizeTest(unittest.TestCase):
    CALIBRATION = ["--calib-dataset", "tinystories", "--datasets-dir",
                   os.path.join(SHARED, "datasets"), "--calib-samples", "8", "--calib-seqlen", "128"]

    def setUp(self):
        self.tmp = tempfile.mkdtemp()

    def tearDown(self):
        shutil.rmtree(self.tmp)

    def quantize(self, out, *args, check=True):
        return nibble("quantize", MODEL, "--work-dir", os.path.join(self.tmp, out), *args, check=check)

    def test_same_settings_give_identical_bytes(self):
        self.quantize("a", "--w-group-size", "32", *self.CALIBRATION)
        self.quantize("b", "--w-group-size", "32", *self.CALIBRATION)
        for name in ("model.safetensors", "config.json", "tokenizer.model"):
            with open(os.path.join(self.tmp, "a", name), "rb") as a, \
                    open(os.path.join(self.tmp, "b", name), "rb") as b:
                self.assertEqual(a.read(), b.read(), name)
        manifest = json.load(open(os.path.join(self.tmp, "a", "nibble_manifest.json")))
        self.assertEqual(manifest["quantization"]["method"], "awq")
        self.assertIn("model.safetensors", manifest["files"])

    def test_sigkill_midway_resumes_to_identical_bytes(self):
        args = ["--w-group-size", "32", "--calib-dataset", "tinystories", "--datasets-dir",
                os.path.join(SHARED, "datasets"), "--calib-samples", "32", "--calib-seqlen", "256"]
        self.quantize("whole", *args)
        work = os.path.join(self.tmp, "killed")
        progress = os.path.join(work, ".nibble-job", "progress.json")
        proc = subprocess.Popen([NIBBLE, "quantize", MODEL, "--work-dir", work, *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while proc.poll() is None and not os.path.exists(progress) and time.time() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)  # right after the first layer's checkpoint
        proc.wait()
        self.assertEqual(proc.returncode, -signal.SIGKILL, "the job ended before the kill")
        self.assertFalse(os.path.exists(os.path.join(work, "nibble_manifest.json")))
        with open(progress) as f:
            done = json.load(f)["completed_layers"]
        self.assertTrue(1 <= done < 5, done)

        resumed = self.quantize("killed", *args)
        self.assertIn("resumed from the checkpoint", resumed.stderr)
        for name in ("model.safetensors", "config.json"):
            with open(os.path.join(self.tmp, "whole", name), "rb") as a, \
                    open(os.path.join(work, name), "rb") as b:
                self.assertEqual(a.read(), b.read(), name)
        self.assertFalse(os.path.exists(os.path.join(work, ".nibble-job")))
        self.assertTrue(os.path.exists(os.path.join(work, "nibble_manifest.json")))

    def test_work_dir_of_another_job_is_refused(self):
        work = os.path.join(self.tmp, "job")
        os.makedirs(os.path.join(work, ".nibble-job"))
        with open(os.path.join(work, ".nibble-job", "job.json"), "w") as f:
            f.write('{"source": "/elsewhere"}')
        out = self.quantize("job", "--method", "rtn", check=False)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("another job", out.stderr)
        self.assertEqual(os.listdir(work), [".nibble-job"])

    def test_quantized_model_generates_and_reports_perplexity(self):
        self.quantize("q", "--w-group-size", "64", *self.CALIBRATION)
        out = json.loads(nibble("generate", "--model", os.path.join(self.tmp, "q"), "--json",
                                "--max-tokens", "12").stdout)
        self.assertTrue(out["text"].startswith("Once upon a time"), out["text"])

    def test_bad_input_is_refused_and_writes_nothing(self):
        cases = [
            (["--calib-dataset", "nosuchset", "--datasets-dir", os.path.join(SHARED, "datasets")],
             "tinystories"),
            (["--method", "rtn", "--w-group-size", "33"], "positive even"),
            (["--method", "rtn", "--w-group-size", "0"], "positive even"),
            (["--method", "rtn", "--w-bits", "8"], "unsupported"),
            (["--calib-samples", "100000", "--calib-seqlen", "128"] + self.CALIBRATION[:4],
             "samples"),
            (["--calib-seqlen", "2048"] + self.CALIBRATION[:4], "context"),
            (["--device", "gpu0"] + self.CALIBRATION, "cuda:N"),
        ]
        for args, word in cases:
            out = self.quantize("bad", *args, check=False)
            self.assertNotEqual(out.returncode, 0, args)
            self.assertIn(word, out.stderr, args)
            self.assertEqual(os.listdir(self.tmp), [], args)  # no partial artifact, no staging

    @unittest.skipIf(shutil.which("nvidia-smi") is not None and
                     subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0,
                     "this machine has a GPU: gpu_awq_test runs the search there")
    def test_gpu_search_without_a_gpu_is_refused_and_writes_nothing(self):
        # A build with CUDA on a machine without a GPU (CI) or a build without CUDA: either
        # way a clear error before the work directory exists.
        out = self.quantize("gpu", "--device", "cuda", *self.CALIBRATION, check=False)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("CUDA", out.stderr)
        self.assertEqual(os.listdir(self.tmp), [])

    def test_unreadable_model_and_occupied_work_dir_are_named(self):
        out = nibble("quantize", "/nonexistent/model", "--work-dir", os.path.join(self.tmp, "x"),
                     "--method", "rtn", check=False)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("/nonexistent/model", out.stderr)
        occupied = os.path.join(self.tmp, "occupied")
        os.makedirs(occupied)
        open(os.path.join(occupied, "other-job"), "w").close()
        out = self.quantize("occupied", "--method", "rtn", check=False)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("not empty", out.stderr)
        self.assertEqual(os.listdir(occupied), ["other-job"])


class FetchTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()

    def tearDown(self):
        shutil.rmtree(self.tmp)

    def test_fetch_from_file_url_verifies_checksums(self):
        out_dir = os.path.join(self.tmp, "fetched")
        nibble("fetch", "stories260K", "--out", out_dir, "--source", "file://" + os.path.abspath(STORIES))
        for name in ("stories260K.bin", "tok512.bin"):
            with open(os.path.join(out_dir, name), "rb") as a, open(os.path.join(STORIES, name), "rb") as b:
                self.assertEqual(a.read(), b.read())
        # A second fetch finds the files present and verified.
        again = nibble("fetch", "stories260K", "--out", out_dir, "--source", "/nonexistent")
        self.assertIn("sha256 verified", again.stderr)

    def test_fetch_from_mirror_directory_via_environment(self):
        out_dir = os.path.join(self.tmp, "fetched")
        env = dict(os.environ, NIBBLE_MODEL_MIRROR=STORIES)
        result = subprocess.run([NIBBLE, "fetch", "stories260K", "--out", out_dir], env=env,
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(os.path.exists(os.path.join(out_dir, "stories260K.bin")))

    def test_corrupted_mirror_is_refused_and_leaves_nothing(self):
        mirror = os.path.join(self.tmp, "mirror")
        os.makedirs(mirror)
        with open(os.path.join(STORIES, "stories260K.bin"), "rb") as f:
            data = bytearray(f.read())
        data[1000] ^= 0xFF
        with open(os.path.join(mirror, "stories260K.bin"), "wb") as f:
            f.write(data)
        out_dir = os.path.join(self.tmp, "fetched")
        out = nibble("fetch", "stories260K", "--out", out_dir, "--source", "file://" + mirror,
                     check=False)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("sha256", out.stderr)
        self.assertEqual(os.listdir(out_dir), [])

    def test_missing_file_at_source_is_named(self):
        out = nibble("fetch", "stories260K", "--out", os.path.join(self.tmp, "x"),
                     "--source", "file:///nonexistent/dir", check=False)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("/nonexistent/dir/stories260K.bin", out.stderr)


def safetensors_header(path):
    """The JSON header of a safetensors file, read per the format (8-byte little-endian length)."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(length))


class SynthTest(unittest.TestCase):
    """`nibble synth`: a real config's shapes (here internlm2-chat-1_8b's, shrunk so a test is
    quick) with random weights, loadable by the engine, dense or W4A16."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        with open(os.path.join(SHARED, "models", "configs", "internlm2-chat-1_8b.json")) as f:
            config = json.load(f)
        config.update(hidden_size=64, intermediate_size=160, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=3, vocab_size=600)
        self.config = os.path.join(self.tmp, "config.json")
        with open(self.config, "w") as f:
            json.dump(config, f)

    def tearDown(self):
        shutil.rmtree(self.tmp)

    def synth(self, name, *args, check=True):
        return nibble("synth", "--config", self.config, "--tokenizer",
                      os.path.join(STORIES, "tok512.model"), "--out", os.path.join(self.tmp, name),
                      *args, check=check)

    def tensors(self, name):
        out = {}
        directory = os.path.join(self.tmp, name)
        for file in os.listdir(directory):
            if file.endswith(".safetensors"):
                header = safetensors_header(os.path.join(directory, file))
                out.update({k: v for k, v in header.items() if k != "__metadata__"})
        return out

    def test_dense_model_has_the_architectures_shapes_and_generates(self):
        self.synth("dense", "--layers", "2")
        tensors = self.tensors("dense")
        # InternLM2's own layout, written from its modeling code's shapes: fused wqkv holds
        # (heads + 2 * kv_heads) * head_dim rows; w1/w3 up, w2 down; untied output.
        head_dim = 64 // 4
        expected = {"model.tok_embeddings.weight": [600, 64], "output.weight": [600, 64],
                    "model.norm.weight": [64]}
        for i in range(2):
            p = f"model.layers.{i}."
            expected.update({p + "attention_norm.weight": [64], p + "ffn_norm.weight": [64],
                             p + "attention.wqkv.weight": [(4 + 2 * 2) * head_dim, 64],
                             p + "attention.wo.weight": [64, 64],
                             p + "feed_forward.w1.weight": [160, 64],
                             p + "feed_forward.w3.weight": [160, 64],
                             p + "feed_forward.w2.weight": [64, 160]})
        self.assertEqual({k: v["shape"] for k, v in tensors.items()}, expected)
        self.assertEqual({v["dtype"] for v in tensors.values()}, {"F16"})
        with open(os.path.join(self.tmp, "dense", "model.safetensors.index.json")) as f:
            self.assertEqual(set(json.load(f)["weight_map"]), set(expected))
        out = json.loads(nibble("generate", "--model", os.path.join(self.tmp, "dense"), "--json",
                                "--max-tokens", "5", "--ignore-eos").stdout)
        self.assertEqual(len(out["generated_ids"]), 5)
        # Same seed, same bytes; another seed, other weights.
        self.synth("again", "--layers", "2")
        self.synth("other", "--layers", "2", "--seed", "1")
        shard = "model-00001-of-00001.safetensors"

        def read(name):
            with open(os.path.join(self.tmp, name, shard), "rb") as f:
                return f.read()
        self.assertEqual(read("dense"), read("again"))
        self.assertNotEqual(read("dense"), read("other"))

    def test_quantized_model_is_an_awq_artifact(self):
        self.synth("w4", "--quant", "awq", "--group-size", "32")
        tensors = self.tensors("w4")
        self.assertEqual(tensors["model.layers.0.attention.wqkv.qweight"]["shape"], [64, 128 // 8])
        self.assertEqual(tensors["model.layers.2.feed_forward.w2.scales"]["shape"], [160 // 32, 64])
        self.assertEqual(tensors["model.layers.2.feed_forward.w2.scales"]["dtype"], "F16")
        self.assertTrue(os.path.exists(os.path.join(self.tmp, "w4", "nibble_manifest.json")))
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "w4.synth-dense")))
        nibble("generate", "--model", os.path.join(self.tmp, "w4"), "--max-tokens", "4")

    def test_bad_input_is_named_and_writes_nothing(self):
        out = self.synth("x", "--quant", "gptq", check=False)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("--quant", out.stderr)
        out = self.synth("x", "--layers", "-1", check=False)
        self.assertIn("layers", out.stderr)
        with open(self.config, "w") as f:
            f.write("{\"hidden_size\": 64}")
        out = self.synth("x", check=False)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("config.json", out.stderr)
        self.assertEqual(sorted(os.listdir(self.tmp)), ["config.json"])


if __name__ == "__main__":
    unittest.main(verbosity=2)
