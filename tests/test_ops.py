"""Operations on a real server: Prometheus metrics, the request log, a canary with rollback, kill -9, monitor and promote."""
import json
import os
import signal
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from conftest import slmops
from slmops_nb.data import TONES, Task
from slmops_nb.deployment import build_direct
from slmops_nb.monitor import served
from slmops_nb.operations import wait_for_challenger
from slmops_nb.registry import aliased, mlflow_client, register_model, set_alias, tracking_uri
from slmops_nb.runtimes import GenAIModel, throughput_copy
from slmops_nb.serve import RequestLog, ServerProcess, read_request_log


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    "workbench:base as ONNX Runtime GenAI fp32 (the champion) and int4 (the challenger), by the builder."
    root = tmp_path_factory.mktemp("ops")
    return {p: build_direct("workbench:base", root/f"base_{p}", p) for p in ("fp32", "int4")}


def _requests_total(base_url: str) -> dict:
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(base_url.removesuffix("/v1") + "/metrics").text)}
    return {(s.labels["version"], s.labels["status"]): s.value for s in families["slmops_requests"].samples if s.name.endswith("_total")}


def test_canary_share_metrics_and_log_through_the_openai_client(tmp_path, folders):
    "A challenger on a 30% canary: sticky users, the share near its weight, /metrics per version, a log line per request, redacted prompts."
    log = tmp_path/"requests.jsonl"
    args = ["--challenger", folders["int4"], "--canary_weight", "0.3", "--request-log", log, "--log-prompts"]
    with ServerProcess(folders["fp32"], log=tmp_path/"serve.log", args=args) as server:
        assert wait_for_challenger(server.base_url)["challenger_loaded"]
        client = OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        for i in range(120):
            r = client.chat.completions.create(model="base_fp32", max_tokens=4, user=f"user-{i % 60}",
                                               messages=[{"role": "user", "content": f"Mail me at ann{i}@example.com, I am so happy"}])
            assert r.choices[0].message.content
        totals = _requests_total(server.base_url)
        torch_libs = [l for l in Path(f"/proc/{server.pid}/maps").read_text().splitlines() if "libtorch" in l]
    assert not torch_libs, torch_libs[:2]  # a server of ONNX folders loads no PyTorch: it is ready in seconds, not ten
    lines = read_request_log(log)
    answered = served(lines)
    assert len(answered) == 120 and all(l["status"] == 200 for l in answered)
    by_user = {}
    for l in answered: by_user.setdefault(l["user"], set()).add(l["role"])
    assert all(len(roles) == 1 for roles in by_user.values())  # sticky: one user, one version
    canary = sum(l["role"] == "challenger" for l in answered)
    assert 12 < canary < 60, canary
    assert totals == {("base_fp32", "200"): 120 - canary, ("base_int4", "200"): canary}
    assert all("<email>" in l["prompt"] and "example.com" not in l["prompt"] for l in answered)
    beside = [l for l in lines if l.get("shadow")]
    assert len(beside) == canary and {l["role"] for l in beside} == {"champion"}


def test_structured_output_validates_and_what_cannot_be_enforced_is_refused(tmp_path, folders):
    "response_format json_schema and json_object answer JSON that validates; --constrain-labels answers a label; a schema the runtime cannot enforce is a 400 that says so."
    import jsonschema
    from openai import BadRequestError
    schema = {"type": "object", "properties": {"tone": {"enum": list(TONES)}, "intensity": {"type": "integer", "minimum": 1, "maximum": 5}},
              "required": ["tone", "intensity"], "additionalProperties": False}
    prompts = ["What a lovely surprise!", "I am so angry about the delay", "The parcel came on Tuesday", "I miss you so much"]
    with ServerProcess(folders["int4"], log=tmp_path/"serve.log", args=["--task_file", "tones", "--constrain-labels"]) as server:
        client = OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        def choice(prompt, **kw):
            return client.chat.completions.create(model="base_int4", max_tokens=96, messages=[{"role": "user", "content": prompt}],
                                                  **kw).choices[0]
        def ask(prompt, **kw): return choice(prompt, **kw).message.content
        objects = []
        for p in prompts:
            jsonschema.validate(json.loads(ask(p, response_format={"type": "json_schema", "json_schema": {"name": "tone", "schema": schema}})), schema)
            c = choice(p, response_format={"type": "json_object"})  # any object: it may run on to max_tokens, as OpenAI's does
            assert c.finish_reason == "length" or isinstance(json.loads(c.message.content), dict)
            objects.append(c.finish_reason == "stop")
            assert ask(p) in TONES  # the label constraint: the workbench base alone answers coarse sentiment
        assert any(objects)
        with pytest.raises(BadRequestError, match="cannot enforce this response_format"):
            ask(prompts[0], response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "tuple"}}})
        assert ask(prompts[0]) in TONES  # and the server goes on


def test_a_failing_challenger_is_rolled_back_and_the_champion_serves_throughout(tmp_path, folders):
    "A challenger whose p95 breaches its limit is rolled back by the server; every request is answered."
    log = tmp_path/"requests.jsonl"
    args = ["--challenger", folders["int4"], "--canary_weight", "0.5", "--max-p95-ms", "0.001", "--request-log", log]
    with ServerProcess(folders["fp32"], log=tmp_path/"serve.log", args=args) as server:
        wait_for_challenger(server.base_url)
        client = OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        for i in range(80):
            client.chat.completions.create(model="base_fp32", max_tokens=4, user=f"u{i}", messages=[{"role": "user", "content": "A fine day"}])
        state = httpx.get(server.base_url + "/rollout").json()
    lines = read_request_log(log)
    answered = served(lines)
    assert state["rolled_back"].startswith("challenger p95 latency") and state["weight"] == 0
    assert all(l["status"] == 200 for l in answered) and len(answered) == 80
    rollback = next(i for i, l in enumerate(lines) if l.get("event") == "rollback")
    assert {l["role"] for l in lines[rollback + 1:] if not l.get("shadow")} == {"champion"}


def test_a_broken_challenger_is_refused_at_load(tmp_path, folders):
    (tmp_path/"broken").mkdir(); (tmp_path/"broken"/"genai_config.json").write_text("{}")
    r = slmops("serve", folders["fp32"], "--challenger", tmp_path/"broken", "--port", "1")
    assert r.returncode == 2 and "is not an ONNX Runtime GenAI model folder" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = slmops("serve", tmp_path/"no-such-model", "--challenger", folders["int4"], "--canary_weight", "1.5", "--port", "1")
    assert r.returncode == 2 and "share of users from 0 to 1, got 1.5" in r.stderr, r.stderr  # before anything loads


def test_kill_9_mid_stream_keeps_the_log_and_the_registry(tmp_path, folders, monkeypatch):
    "kill -9 of a server from the registry while it streams: whole log lines up to the kill, a restart appends, the registry is as it was."
    run = tmp_path/"run"; run.mkdir()
    slow = throughput_copy(folders["fp32"], tmp_path/"slow")  # never stops early: a long stream to kill
    v = register_model("demo-ort", slow, {"slmops.precision": "fp32"}, run)
    set_alias(run, "demo-ort", v.version, "champion")
    client = mlflow_client(tracking_uri(run))
    before = [(m.name, m.version, m.tags, m.aliases) for m in client.search_model_versions()]
    log = tmp_path/"requests.jsonl"
    args = ["--registry", run, "--request-log", log]
    with ServerProcess("models:/demo-ort@champion", log=tmp_path/"serve.log", args=args) as server:
        chat = OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        for _ in range(3): chat.chat.completions.create(model="demo-ort-champion", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
        stream = chat.chat.completions.create(model="demo-ort-champion", max_tokens=220, stream=True,
                                              messages=[{"role": "user", "content": "tell me"}])
        next(iter(stream))
        os.kill(server.pid, signal.SIGKILL)  # the stream's line is written when it ends: there only if it ended before the kill
        server.proc.wait()
    lines = read_request_log(log)  # every line whole and parsed
    assert [l["status"] for l in lines[:3]] == [200] * 3 and len(lines) in (3, 4) and log.read_bytes().endswith(b"\n")
    with ServerProcess("models:/demo-ort@champion", log=tmp_path/"serve2.log", args=args) as server:
        OpenAI(base_url=server.base_url, api_key="unused").chat.completions.create(
            model="demo-ort-champion", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert [l["status"] for l in read_request_log(log)] == [200] * (len(lines) + 1)  # the restart appended after them
    assert [(m.name, m.version, m.tags, m.aliases) for m in client.search_model_versions()] == before


def _log_of(task: Task, split: str, n: int, path: Path):
    "A request log as the server writes it, of `n` of the task's `split` prompts, answered with their labels."
    log = RequestLog(path, prompts=True)
    for r in (task.splits()[split] * 3)[:n]:
        prompt = task.messages(r)[-1]["content"]
        log.write({"status": 200, "role": "champion", "ms": 50.0, "prompt_words": len(prompt.split()), "answer": task.answer(r)}, prompt)
    log.close()


def test_slmops_monitor_exits_1_on_drift_and_writes_its_report(tmp_path):
    tones, shop = Task.named("tones"), Task.named("shop_qa")
    _log_of(tones, "test", 300, tmp_path/"calm.jsonl")
    r = slmops("monitor", tmp_path/"calm.jsonl", "--window", "100", "--out", tmp_path/"calm")
    assert r.returncode == 0 and r.stdout.count("no alarm") == 3, r.stdout + r.stderr
    _log_of(tones, "test", 200, tmp_path/"drift.jsonl")
    _log_of(shop, "test", 100, tmp_path/"drift.jsonl")  # the same log, then the shop's questions: new words, new answers
    r = slmops("monitor", tmp_path/"drift.jsonl", "--window", "100", "--out", tmp_path/"drift")
    report = json.loads((tmp_path/"drift"/"monitor.json").read_text())
    assert r.returncode == 1 and report["alarm_windows"] == [2], r.stdout + r.stderr
    assert (tmp_path/"drift"/"monitor.png").stat().st_size > 1000 and "| 2 | 100 |" in (tmp_path/"drift"/"monitor.md").read_text()
    r = slmops("monitor", tmp_path/"missing.jsonl")
    assert r.returncode == 2 and "slmops serve MODEL --request-log" in r.stderr


def test_slmops_promote_moves_the_alias_only_when_the_gate_passes_and_foundry_local_serves_it(tmp_path, folders):
    run = tmp_path/"run"; run.mkdir()
    for alias, p in (("champion", "fp32"), ("challenger", "int4")):
        set_alias(run, "demo-ort", register_model("demo-ort", folders[p], {"slmops.precision": p}, run).version, alias)
    canary = ([{"status": 200, "role": "champion", "ms": 100.0}] * 300 + [{"status": 200, "role": "challenger", "ms": 90.0}] * 120)
    (tmp_path/"bad.jsonl").write_text("".join(json.dumps(l) + "\n" for l in canary + [{"event": "rollback", "reason": "errors"}]))
    r = slmops("promote", "demo-ort", "--registry", run, "--log", tmp_path/"bad.jsonl")
    assert r.returncode == 1 and "FAIL  no rollback" in r.stdout, r.stdout + r.stderr
    assert aliased(mlflow_client(tracking_uri(run)), "demo-ort") == {"champion": "1", "challenger": "2"}
    (tmp_path/"good.jsonl").write_text("".join(json.dumps(l) + "\n" for l in canary))
    (tmp_path/"metrics.json").write_text(json.dumps({"checklist": {"int4 within 1 point of fp32": True}}))
    r = slmops("promote", "demo-ort", "--registry", run, "--log", tmp_path/"good.jsonl", "--checklist", tmp_path/"metrics.json")
    assert r.returncode == 0 and "version 2 is the champion" in r.stdout, r.stdout + r.stderr
    assert aliased(mlflow_client(tracking_uri(run)), "demo-ort") == {"champion": "2"}
    home, msgs = tmp_path/"foundry", [{"role": "user", "content": "I am so happy"}]
    with ServerProcess("models:/demo-ort@champion", log=tmp_path/"serve.log", runtime="foundry",  # the new champion, by its alias
                       args=["--registry", run, "--foundry-home", home]) as server:
        answer = OpenAI(base_url=server.base_url, api_key="unused").chat.completions.create(
            model="demo-ort-champion", max_tokens=6, messages=msgs).choices[0].message.content
        assert _requests_total(server.base_url) == {("demo-ort:2", "200"): 1.0}  # Foundry Local's id of the registry's demo-ort/2
    assert answer == GenAIModel(folders["int4"]).chat(msgs, 6) and (home/"models"/"demo-ort-2"/"inference_model.json").exists()
