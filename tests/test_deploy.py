"""Chapter 04's library on the workbench base: ONNX Runtime GenAI, the OpenAI-compatible server, Foundry Local, the benchmark."""
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from slmops_nb.artifacts import record_artifact
from slmops_nb.core import SlmopsError, read_json, write_json
from slmops_nb.data import Task, tone_split
from slmops_nb.deployment import (build_direct, builder_config, finetuned_models, olive_build, olive_int8)
from slmops_nb.runtimes import FoundryLocal, GenAIModel, foundry_model_folder
from slmops_nb.distillation import endpoint_answers, synthesize
from slmops_nb.serve import RequestError, ServerProcess, load_test, parse_chat_request
from slmops_nb.models import resolve_model

SLMOPS = str(Path(sys.executable).parent/"slmops")  # the console script of this environment
SENTIMENTS = ["negative", "neutral", "positive"]  # what workbench:base answers


@pytest.fixture(scope="module")
def genai_dir(tmp_path_factory):
    "workbench:base as an ONNX Runtime GenAI fp32 folder (the builder, no Olive: a few seconds)."
    return build_direct("workbench:base", tmp_path_factory.mktemp("genai")/"base_fp32", "fp32")


@pytest.fixture(scope="module")
def server(genai_dir):
    with ServerProcess(genai_dir, api_key="test-key") as s: yield s


def test_genai_model_answers_like_pytorch(genai_dir):
    m = GenAIModel(genai_dir)
    phrases = [r["phrase"] for r in tone_split("test")[:8]]
    answers = [m.chat([{"role": "user", "content": p}], 8) for p in phrases]
    assert set(answers) <= set(SENTIMENTS)
    forced = list(m.chat_stream([{"role": "user", "content": phrases[0]}], 12, ignore_eos=True))
    assert len(forced) == 12
    with pytest.raises(SlmopsError, match="context length"):
        list(m.stream(list(range(300)), 8))


@pytest.mark.parametrize("body, param", [
    (b"{not json", None), (b'{"messages": [{"role": "user", "content": "\xff"}]}', None), (b"[1, 2]", None),
    (b'{"messages": "hi"}', "messages"), (b'{"messages": []}', "messages"),
    (b'{"messages": [{"role": "robot", "content": "hi"}]}', "messages[0].role"),
    (b'{"messages": [{"role": "user", "content": 42}]}', "messages[0].content"),
    (b'{"messages": [{"role": "user", "content": "   "}]}', "messages"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "8"}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream"),
])
def test_bad_requests_are_refused_with_openai_errors(body, param):
    with pytest.raises(RequestError) as e: parse_chat_request(body)
    assert e.value.status == 400 and e.value.param == param and e.value.body()["error"]["message"]


def test_server_through_the_openai_client(server):
    client = OpenAI(base_url=server.base_url, api_key="test-key", max_retries=0)
    model = client.models.list().data[0].id
    phrase = tone_split("test")[0]["phrase"]
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": phrase}], max_tokens=8)
    assert r.choices[0].message.content in SENTIMENTS and r.choices[0].finish_reason == "stop" and r.usage.prompt_tokens > 0
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": phrase}], max_tokens=8,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_server_api_key_and_4xx_answers(server):
    url = server.base_url + "/chat/completions"
    ok = {"messages": [{"role": "user", "content": "great"}]}
    assert httpx.post(url, json=ok).status_code == 401
    assert httpx.post(url, json=ok, headers={"Authorization": "Bearer wrong"}).status_code == 401
    auth = {"Authorization": "Bearer test-key"}
    for body, status, code in [(b"{oops", 400, None), (b'{"messages": [{"role": "user", "content": "\xfe"}]}', 400, None),
                               (json.dumps({"messages": [{"role": "user", "content": "word " * 400}]}).encode(), 400,
                                "context_length_exceeded"),
                               (json.dumps({**ok, "model": "gpt-9"}).encode(), 404, "model_not_found")]:
        r = httpx.post(url, content=body, headers=auth)
        assert r.status_code == status and r.json()["error"]["code"] == code and r.json()["error"]["message"], body
    assert httpx.post(url, json=ok, headers=auth).status_code == 200  # still serving


def test_server_concurrent_requests_are_answered_correctly(server, genai_dir):
    phrases = [r["phrase"] for r in tone_split("test")[:12]]
    m = GenAIModel(genai_dir)
    expected = {p: m.chat([{"role": "user", "content": p}], 8) for p in phrases}
    res = load_test(server, phrases, 32, 8, 8, expected)
    assert res["errors"] == 0 and res["wrong_answers"] == 0 and res["concurrency"] > 1, res


def test_endpoint_teacher_synthesizes_through_slmops_serve(genai_dir, tmp_path):
    "Chapter 02's stage 1 with an OpenAI-compatible endpoint (slmops serve) as the teacher."
    with ServerProcess(genai_dir, log=tmp_path/"serve.log") as s:
        answers = endpoint_answers(s.base_url, [r["phrase"] for r in tone_split("test")[:10]])
    syn = synthesize(answers, tmp_path, Task(labels=SENTIMENTS))
    assert syn["total"] == 10 and syn["kept"] > 0 and (tmp_path/"synthetic.jsonl").exists()
    assert {r["tone"] for r in syn["records"]} <= set(SENTIMENTS)


def test_foundry_local_registers_loads_and_chats(genai_dir, tmp_path):
    folder = foundry_model_folder(genai_dir, tmp_path/"models"/"slmops-base", "slmops-base")
    spec = read_json(folder/"inference_model.json")
    assert spec["Name"] == "slmops-base" and "{Content}" in spec["PromptTemplate"]["prompt"] and spec["ModelConfig"]
    fl = FoundryLocal(tmp_path/"foundry")
    model = fl.register(folder, "slmops-base:1")
    assert model.is_loaded
    phrase = tone_split("test")[0]["phrase"]
    assert fl.chat([{"role": "user", "content": phrase}], 8) == GenAIModel(genai_dir).chat([{"role": "user", "content": phrase}], 8)
    fl.close()
    with pytest.raises(SlmopsError, match="name:version"): FoundryLocal(tmp_path/"foundry").register(folder, "no-version")


def test_conversion_inputs_are_checked(tmp_path):
    with pytest.raises(SlmopsError, match="not an ONNX Runtime GenAI model folder"): olive_int8(tmp_path, tmp_path/"out")
    with pytest.raises(SlmopsError, match="int8"): olive_build("workbench:base", tmp_path/"out", "int8")
    with pytest.raises(SlmopsError, match="block size"): builder_config("workbench:base", "int4", block_size=48)
    with pytest.raises(SlmopsError, match="not a model folder"): olive_build(tmp_path, tmp_path/"out", "int4")
    assert not (tmp_path/"out").exists()


def test_olive_quantization_makes_a_folder_genai_runs(genai_dir, tmp_path):
    "Olive's RTN pass renames the logits output; quantize_genai points genai_config.json at it, so the folder runs."
    from slmops_nb.deployment import fit_genai_outputs, frontier_passes, quantize_genai
    passes = frontier_passes(genai_dir, block_sizes=(32,))
    assert set(passes) == {"ort_int4_rtn_b32_sym", "ort_int4_rtn_b32_asym", "ort_int8_rtn_b32", "ort_int4_mixed", "ort_int4_hqq",
                           "ort_int4_kquant"}
    assert passes["ort_int4_mixed"]["int8"]["nodes_to_include"] == ["/model/embed_tokens/Gather", "/lm_head/MatMul"]
    two = quantize_genai(genai_dir, tmp_path/"int4", {n: passes[n] for n in ("ort_int4_rtn_b32_sym", "ort_int4_mixed")})
    assert list(two) == ["ort_int4_rtn_b32_sym", "ort_int4_mixed"] and all(f.parent == tmp_path/"int4" for f in two.values())
    logits = {n: read_json(q/"genai_config.json")["model"]["decoder"]["outputs"]["logits"] for n, q in two.items()}
    assert logits == {"ort_int4_rtn_b32_sym": "logits_Q4", "ort_int4_mixed": "logits_Q8"}  # mixed: lm_head at 8 bits
    for q in two.values():  # one Olive process made both, each a folder GenAI runs
        assert (q/"model.onnx").stat().st_size < 0.3 * sum(f.stat().st_size for f in genai_dir.glob("model.onnx*"))
        assert isinstance(GenAIModel(q).chat([{"role": "user", "content": "Wow!"}], 4), str)
    assert "$ olive run --config" in (tmp_path/"int4.olive.log").read_text()
    q = two["ort_int4_rtn_b32_sym"]
    cfg = read_json(q/"genai_config.json")
    cfg["model"]["decoder"]["outputs"]["logits"] = "scores"
    write_json(q/"genai_config.json", cfg)
    with pytest.raises(SlmopsError, match="names the output 'scores', which model.onnx lacks"): fit_genai_outputs(q)


def test_olive_session_tuning_times_each_thread_count(genai_dir, tmp_path):
    "Olive's OrtSessionParamsTuning on decode steps read off the graph: a latency per thread count, the fastest chosen, applied for GenAI."
    from slmops_nb.deployment import tune_session_params, with_session_options
    t = tune_session_params(genai_dir, tmp_path/"tuning", threads=(1, 2))
    assert [p["intra_op_num_threads"] for p in t["points"]] == [1, 2] and all(p["latency_ms"] > 0 for p in t["points"])
    assert t["chosen"]["intra_op_num_threads"] == min(t["points"], key=lambda p: p["latency_ms"])["intra_op_num_threads"]
    assert not list((tmp_path/"tuning").glob("model.onnx*"))  # the settings are the result, not a copy of the graph
    tuned = with_session_options(genai_dir, tmp_path/"tuned", {"intra_op_num_threads": 1})
    assert read_json(tuned/"genai_config.json")["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 1
    assert (tuned/"model.onnx").stat().st_ino == (genai_dir/"model.onnx").stat().st_ino  # hard-linked, not copied
    wow = [{"role": "user", "content": "Wow!"}]
    assert GenAIModel(tuned).chat(wow, 4) == GenAIModel(genai_dir).chat(wow, 4)
    with pytest.raises(SlmopsError, match=r"\['graph_optimization_level'\] are not set here"):
        with_session_options(genai_dir, tmp_path/"bad", {"graph_optimization_level": 99})
    assert not (tmp_path/"bad").exists()


def test_llama_cpp_side_by_side_with_genai(genai_dir, tmp_path):
    "The workbench base to GGUF by llama.cpp's converter (its tokenizer taken as GPT-2's) and quantizer; slmops bench runs both runtimes in one run."
    from slmops_nb.deployment import gguf_export
    from slmops_nb.runtimes import ChatModel, LlamaCppModel
    base = Path(resolve_model("workbench:base"))
    gguf = gguf_export(base, tmp_path, ("q4_0",))
    assert list(gguf) == ["q4_0"] and (gguf["q4_0"]/"model.gguf").stat().st_size < 0.5 * (base/"model.safetensors").stat().st_size
    model, wow = LlamaCppModel(gguf["q4_0"]), [{"role": "user", "content": "Wow!"}]
    assert model.prompt_ids(wow) == ChatModel.prompt_ids(model, wow)  # llama.cpp tokenizes as the Hugging Face tokenizer does
    assert len(list(model.chat_stream(wow, 6, ignore_eos=True))) == 6
    model.close()
    out = tmp_path/"bench.json"
    r = subprocess.run([SLMOPS, "bench", f"ort_fp32=genai:{genai_dir}", f"q4_0=llamacpp:{gguf['q4_0']}", "--requests", "2",
                        "--eval-limit", "8", "--max-new-tokens", "8", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    bench = read_json(out)["variants"]
    assert bench["q4_0"]["kind"] == "llamacpp" and bench["q4_0"]["tokens_per_request"] == 8 and bench["ort_fp32"]["tokens_per_second"] > 0
    with pytest.raises(SlmopsError, match="Unknown GGUF types"): gguf_export(base, tmp_path/"other", ("q3_k",))


def test_slmops_bench_writes_bench_json(genai_dir, tmp_path):
    out = tmp_path/"bench.json"
    r = subprocess.run([SLMOPS, "bench", f"pytorch_fp32=pytorch:{resolve_model('workbench:base')}",
                        f"ort_fp32=genai:{genai_dir}", "--requests", "2", "--eval-limit", "8", "--max-new-tokens", "8",
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    bench = read_json(out)["variants"]
    for name in ("pytorch_fp32", "ort_fp32"):
        assert {"size_bytes", "load_seconds", "ttft_ms", "tokens_per_second", "latency_ms_p50", "latency_ms_p95",
                "peak_memory_mb", "accuracy"} <= set(bench[name]) and bench[name]["tokens_per_second"] > 0
        assert bench[name]["tokens_per_request"] == 8
    bad = subprocess.run([SLMOPS, "bench", "x=onnx:/nowhere"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Unknown runtime" in bad.stderr


def test_slmops_profile_splits_a_decode_step_by_operator(genai_dir, tmp_path):
    out = tmp_path/"profile.json"
    r = subprocess.run([SLMOPS, "profile", str(genai_dir), "--max-new-tokens", "6", "--threads", "1", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    prof = read_json(out)
    assert prof["steps"] == 5 and prof["threads"] == 1 and "ms a token" in r.stdout
    assert 0 < prof["op_ms"] <= prof["run_ms"] <= prof["token_ms"] and sum(prof["by_op_ms"].values()) == pytest.approx(prof["op_ms"])
    bad = subprocess.run([SLMOPS, "profile", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode != 0 and "genai_config.json" in bad.stderr


def test_olive_model_builder_failure_is_a_clear_error(tmp_path):
    "The ModelBuilder cannot make int8 on CPU: Olive exits 0 without a model; run_olive names the missing files, keeps nothing."
    from slmops_nb.runtimes import GENAI_FILES
    from slmops_nb.tools import ToolError, run_olive
    with pytest.raises(ToolError, match="did not write"):
        run_olive(["auto-opt", "-m", resolve_model("workbench:base"), "--use_model_builder", "--precision", "int8",
                   "--device", "cpu", "--provider", "CPUExecutionProvider"], tmp_path/"int8", GENAI_FILES)
    assert not (tmp_path/"int8").exists() and (tmp_path/"int8.olive.log").exists()


def _chapter03(folder, task=None):
    "A run folder in which chapter 03 recorded a merged model, two adapters and (when given) its task."
    for d in ("merged-tones", "lora/model", "qa/model"): (folder/d).mkdir(parents=True)
    (folder/"merged-tones"/"config.json").write_text("{}")
    for d in ("lora/model", "qa/model"): (folder/d/"adapter_config.json").write_text("{}")
    made = {"merged_model": "merged-tones", "task_adapter": "lora/model", "qa_adapter": "qa/model"}
    if task is not None: made["task"] = write_json(folder/"task.json", task.describe()).name
    for name, path in made.items(): record_artifact(folder, name, folder/path)
    return folder.parent/"04_deployment"


def test_chapter04_takes_the_task_chapter03_trained_on(tmp_path, intents_csv):
    "Deploying chapter 03's model scores it on chapter 03's data, never silently on the tones."
    intents = Task(str(intents_csv), input_column="utterance", label_column="intent")
    ch = _chapter03(tmp_path/"run"/"03_finetuning", intents)
    assert finetuned_models(ch)["task"] == intents
    assert finetuned_models(ch, task=intents)["task"].classes == intents.classes
    with pytest.raises(SlmopsError, match="Chapter 03 in .* fine-tuned on Task.*intents.csv.*pass the same data parameters"):
        finetuned_models(ch, task=Task(str(intents_csv), input_column="utterance", label_column="intent", seed=1))
    assert finetuned_models(_chapter03(tmp_path/"old"/"03_finetuning"))["task"] == Task()  # a run whose chapter 03 recorded no task
