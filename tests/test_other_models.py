"""Models of other architectures and chat formats (Qwen2 with ChatML, Phi-3, Gemma) through the whole path: stop tokens,
fine-tuning, merging, conversion, Foundry Local, serving."""
from pathlib import Path

import pytest
from openai import OpenAI
from transformers import GenerationConfig

from conftest import slmops
from slmops_nb.core import SlmopsError, read_json
from slmops_nb.data import TONES, Task, stop_token_ids, tone_split
from slmops_nb.deployment import build_direct, exportable_adapter, olive_build
from slmops_nb.runtimes import FoundryLocal, GenAIModel, TorchModel, foundry_model_folder
from slmops_nb.train import FlatCollator, PadCollator, task_examples
from slmops_nb.adapt import FinetuneConfig, finetune, load_adapters, lora_targets, merge_adapter
from slmops_nb.serve import ServerProcess
from slmops_nb.models import TINY_FAMILIES, load_model, load_tokenizer, save_model, tiny_model
from slmops_nb.evaluate import logit_gap, next_token_logits



def teach_the_chat(model_dir, out: Path) -> tuple[dict, list[dict]]:
    "A tiny random model, fully fine-tuned on 96 tone chats until it answers a label and ends its turn, saved in `out`; the run and its examples."
    tok = load_tokenizer(model_dir)
    ex = task_examples(tok, Task(), tone_split("train")[:96])
    res = finetune("full", model_dir, tok, ex, ex[:16], out.with_name(out.name + "-ft"), FinetuneConfig(epochs=12, lr=3e-3, batch_size=16))
    save_model(res["model"], tok, out)
    return res, ex


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_one_row_batches_train_as_padded_ones(family, tmp_path):
    "FlatCollator's one row (the examples end to end, their own positions) gives each family the padded batch's loss and gradients."
    import torch
    model_dir = tiny_model(tmp_path/family, family)
    tok, model = load_tokenizer(model_dir), load_model(model_dir).train()
    batch = task_examples(tok, Task(), tone_split("train")[:6])
    losses, grads = [], []
    for collate in (PadCollator(tok.pad_token_id), FlatCollator(tok.pad_token_id)):
        model.zero_grad()
        loss = model(**collate(batch)).loss
        loss.backward()
        losses.append(loss.item()); grads.append(model.get_input_embeddings().weight.grad.clone())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and torch.allclose(grads[0], grads[1], atol=1e-6), family


def test_a_tied_model_is_adapted_and_merged_without_touching_its_embeddings(tmp_path):
    """A model whose output layer is its input embedding (SmolLM2, Qwen2.5-0.5B): LoRA leaves the shared matrix alone, so the
    merged model computes the adapted model's logits and keeps the base's embeddings."""
    import torch
    base = tiny_model(tmp_path/"tied", "qwen2", tie_word_embeddings=True)
    tok = load_tokenizer(base)
    assert "lm_head" not in lora_targets(base) and "lm_head" in lora_targets(tiny_model(tmp_path/"untied", "qwen2"))
    ex = task_examples(tok, Task(), tone_split("train")[:32])
    finetune("lora", base, tok, ex, ex[:8], tmp_path/"lora", FinetuneConfig(max_steps=4, lr=5e-2, batch_size=8, lora_dropout=0.0))
    prompts = [r["phrase"] for r in tone_split("test")[:4]]
    adapted = next_token_logits(load_adapters(base, {"lora": tmp_path/"lora"/"model"}), tok, prompts)
    merged = merge_adapter(base, tmp_path/"lora"/"model", tok, tmp_path/"merged")
    assert logit_gap(adapted, next_token_logits(merged, tok, prompts), "the merged tied model")["relative"] < 1e-3
    assert logit_gap(next_token_logits(load_model(base), tok, prompts), adapted, tolerance=float("inf"))["relative"] > 1e-3  # it learned
    assert torch.equal(merged.get_input_embeddings().weight, load_model(base).get_input_embeddings().weight)
    assert load_model(tmp_path/"merged").config.tie_word_embeddings


@pytest.fixture(scope="module")
def chatml_deployed(qwen_dir, tmp_path_factory):
    "The tiny ChatML model taught to answer a tone and end its turn, saved with save_model and converted to fp32."
    tmp = tmp_path_factory.mktemp("chatml")
    tok = load_tokenizer(qwen_dir)
    teach_the_chat(qwen_dir, tmp/"merged")
    return {"merged": tmp/"merged", "ort": build_direct(tmp/"merged", tmp/"ort_fp32", "fp32"), "tok": tok}


def test_stop_token_is_the_chat_templates_end_of_turn(qwen_dir, chatml_deployed):
    tok = load_tokenizer(qwen_dir)
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 2) and stop_token_ids(tok) == [2]  # <|im_end|>, never the pad token
    assert GenerationConfig.from_pretrained(chatml_deployed["merged"]).eos_token_id == [2]
    assert read_json(chatml_deployed["ort"]/"genai_config.json")["model"]["eos_token_id"] in (2, [2])


def test_converted_chatml_model_stops_in_process_and_served(chatml_deployed):
    genai, phrases = GenAIModel(chatml_deployed["ort"]), [r["phrase"] for r in tone_split("test")[:6]]
    for p in phrases:
        ids = genai.prompt_ids([{"role": "user", "content": p}])
        tokens = list(genai.stream(ids, 32))
        assert 0 < len(tokens) < 32 and "\n\n" not in "".join(tokens), tokens  # it ends its turn, no run of newlines
    with ServerProcess(chatml_deployed["ort"]) as server:
        client = OpenAI(base_url=server.base_url, api_key="unused")
        r = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=32,
                                           messages=[{"role": "user", "content": phrases[0]}])
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 32, r


def test_conversion_is_checked_on_logits_not_on_near_tie_answers(qwen_dir, chatml_deployed):
    "fp32 export of a barely trained ChatML model: its logits match PyTorch's; the logits of another model do not."
    genai, tok = GenAIModel(chatml_deployed["ort"]), chatml_deployed["tok"]
    prompts = [r["phrase"] for r in tone_split("test")[:24]]
    exported = genai.next_token_logits(prompts)
    gap = logit_gap(next_token_logits(load_model(chatml_deployed["merged"]), tok, prompts), exported, "the fp32 export")
    assert gap["relative"] <= gap["tolerance"]
    with pytest.raises(SlmopsError, match="the fp32 export computes other logits than its reference.*expected at most 1e-03"):
        logit_gap(next_token_logits(load_model(qwen_dir), tok, prompts), exported, "the fp32 export")  # the untrained base


def test_slmops_export_then_serve_refuses_and_explains(qwen_dir, tmp_path):
    r = slmops("serve", tmp_path/"no-such-folder")
    assert r.returncode == 2 and "no such folder" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = slmops("serve", qwen_dir)
    assert r.returncode == 2 and f"is a Hugging Face model folder, not an ONNX Runtime GenAI model folder" in r.stderr, r.stderr
    assert f"slmops export {qwen_dir} OUT_FOLDER --precision int4" in r.stderr
    out = tmp_path/"qwen-int4"
    r = slmops("export", qwen_dir, out, "--precision", "int4", "--tool", "builder")
    assert r.returncode == 0 and f"serve it: slmops serve {out}" in r.stdout, r.stdout + r.stderr[-2000:]
    assert GenAIModel(out).chat([{"role": "user", "content": "hi"}], 4) is not None


FAMILIES = {"phi3": ("Phi3ForCausalLM", "<|end|>", "qkv_proj"), "gemma": ("GemmaForCausalLM", "<end_of_turn>", "q_proj")}


@pytest.mark.parametrize("family", FAMILIES)
def test_another_family_end_to_end(family, tmp_path):
    "A tiny Phi-3 or Gemma folder, taught the chat: LoRA and QLoRA, merge, int4, Olive int4 with the adapter, Foundry Local, serving."
    arch, turn_end, fused_or_not = FAMILIES[family]
    base = tiny_model(tmp_path/family, family)
    tok = load_tokenizer(base)
    assert load_model(base).config.architectures == [arch] and tok.convert_tokens_to_ids(turn_end) in stop_token_ids(tok)
    assert fused_or_not in lora_targets(base)  # Phi-3's fused qkv_proj, Gemma's q_proj: read from the model, not a list
    taught, ex = teach_the_chat(base, tmp_path/"base")  # a base that knows the chat, as a hub model arrives
    base = tmp_path/"base"
    lora = finetune("lora", base, tok, ex, ex[:16], tmp_path/"lora", FinetuneConfig(epochs=2, lr=1e-3, batch_size=16, lora_dropout=0.0))
    qlora = finetune("qlora", base, tok, ex, ex[:16], tmp_path/"qlora", FinetuneConfig(epochs=1, batch_size=16))
    assert taught["best_eval_loss"] < 1.0 and lora["steps"] == 12 and qlora["steps"] == 6, (taught["best_eval_loss"], lora, qlora)
    assert load_adapters(base, {"qlora": tmp_path/"qlora"/"model"}).active_adapter == "qlora"

    merge_adapter(base, tmp_path/"lora"/"model", tok, tmp_path/"merged")
    merged = tmp_path/"merged"
    msgs = [[{"role": "user", "content": r["phrase"]}] for r in tone_split("train")[:4]]  # phrases it was taught
    assert {TorchModel(merged).chat(m, 16) for m in msgs} <= set(TONES)  # the merged model answers in labels and ends its turn
    int4 = build_direct(merged, tmp_path/"int4", "int4")
    answers = [GenAIModel(int4).chat(m, 16) for m in msgs]  # int4 at hidden size 64 is lossy: these answers are compared, not checked

    with_adapter = olive_build(base, tmp_path/"int4_adapter", "int4", adapter_path=exportable_adapter(tmp_path/"lora"/"model", tmp_path/"a"))
    genai = GenAIModel(with_adapter).load_adapter("tones", with_adapter/"adapter_weights.onnx_adapter")
    assert all(len(tok(genai.chat(m, 16, adapter="tones"))["input_ids"]) < 16 for m in msgs)  # with the adapter, it ends its turn
    with pytest.raises(SlmopsError, match="cannot run them empty: pass adapter="): genai.chat(msgs[0], 4)

    fl = FoundryLocal(tmp_path/"foundry")
    fl.register(foundry_model_folder(int4, tmp_path/"fl"/family, family), f"tiny-{family}:1")
    assert [fl.chat(m, 16) for m in msgs] == answers  # Foundry Local renders the prompt from our template: the same answers
    fl.close()
    with ServerProcess(int4) as server:
        client = OpenAI(base_url=server.base_url, api_key="unused")
        r = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=16, messages=msgs[0])
        assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == answers[0], r
