import pytest
import torch

from slmops_nb.core import SlmopsError
from slmops_nb.data import load_records, tone_split
from slmops_nb.distillation import (STUDENT, DistillConfig, check_same_vocabulary, kd_loss, load_answer_logits, make_student, save_answer_logits, synthesize,
                               train_gkd, train_student, train_students, validate_answers)
from slmops_nb.evaluate import generate_answers
from slmops_nb.train import PadCollator, TrainConfig, encode_chats
from slmops_nb.models import load_tokenizer, save_model


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("workbench:tokenizer")


def _answer(prompt, answer, finished=True, confidence=0.99):
    return {"prompt": prompt, "answer": answer, "finished": finished, "confidence": confidence}


def test_malformed_teacher_answers_are_dropped_and_counted():
    answers = [_answer("a", "joy"), _answer("b", " "), _answer("c", "sadn", finished=False), _answer("d", "furious"),
               _answer("e", "Anger."), _answer("f", "fear", confidence=0.2)]
    kept, dropped = validate_answers(answers, min_confidence=0.5)
    assert [(r["phrase"], r["tone"]) for r in kept] == [("a", "joy"), ("e", "anger")]
    assert dropped == {"empty": 1, "truncated": 1, "not_a_label": 1, "low_confidence": 1}
    kept, dropped = validate_answers(answers, min_confidence=0.0)
    assert len(kept) == 3 and dropped["low_confidence"] == 0


def test_untrained_teacher_answers_are_validated_and_saved(tmp_path, tok):
    "A real model that knows nothing: its answers are not labels, or cut off, and are dropped with a reason."
    model, _ = make_student(STUDENT, "workbench:tokenizer", seed=0)
    prompts = [r["phrase"] for r in tone_split("test")[:12]]
    answers = generate_answers(model, tok, prompts, max_new_tokens=3, scores=True)
    assert [a["prompt"] for a in answers] == prompts and all(0 <= a["confidence"] <= 1 for a in answers)
    kept, dropped = validate_answers(answers)
    assert not kept and sum(dropped.values()) == len(prompts) and dropped["low_confidence"] == 0
    (tmp_path/"synthetic.jsonl").write_text('{"phrase": "earlier", "tone": "joy"}\n')
    with pytest.raises(SlmopsError, match="no usable answer out of 12"):
        synthesize(answers, tmp_path)
    assert load_records(tmp_path/"synthetic.jsonl") == [{"phrase": "earlier", "tone": "joy"}]  # nothing lost
    good = answers[:3] + [_answer("x", "surprise")]
    res = synthesize(good, tmp_path)
    assert res["kept"] == 1 and load_records(tmp_path/"synthetic.jsonl") == [{"phrase": "x", "tone": "surprise", "confidence": 0.99}]
    assert [r["prompt"] for r in load_records(tmp_path/"synthetic_dropped.jsonl")] == prompts[:3]


def _batch_logits(tok):
    model, _ = make_student(STUDENT, "workbench:tokenizer", seed=1)
    batch = PadCollator(tok.pad_token_id)(encode_chats(tok, [("I am so happy today.", "joy"), ("It is Monday.", "neutral")]))
    with torch.no_grad(): out = model(**batch)
    return out, batch["labels"]


def test_kd_loss_is_cross_entropy_at_alpha_0(tok):
    out, labels = _batch_logits(tok)
    teacher = torch.randn_like(out.logits)
    assert torch.allclose(kd_loss(out.logits, teacher, labels, alpha=0.0, temperature=3.0), out.loss, atol=1e-5)


def test_kd_loss_is_zero_when_student_equals_teacher_at_alpha_1(tok):
    out, labels = _batch_logits(tok)
    assert kd_loss(out.logits, out.logits.clone(), labels, alpha=1.0, temperature=2.0).abs() < 1e-6
    assert kd_loss(out.logits, torch.randn_like(out.logits), labels, alpha=1.0) > 0.1


def test_vocabulary_check_refuses_a_different_tokenizer(tok):
    other = load_tokenizer("workbench:tokenizer")
    other.add_tokens(["<|tool|>"])
    with pytest.raises(SlmopsError, match=r"Logit KD needs one vocabulary: .* 2048 tokens, the student 2049, .*sequence-level KD"):
        check_same_vocabulary(tok, other)
    a, _ = make_student(STUDENT, "workbench:tokenizer")
    b, _ = make_student(STUDENT, "workbench:tokenizer")
    b.resize_token_embeddings(len(tok) + 8)
    with pytest.raises(SlmopsError, match=f"outputs {len(tok)} logits per token, the student {len(tok) + 8}"):
        check_same_vocabulary(tok, tok, a, b)
    check_same_vocabulary(tok, load_tokenizer("workbench:tokenizer"), a, make_student(STUDENT, "workbench:tokenizer")[0])


def test_train_student_refuses_bad_method_and_budget(tok):
    model, _ = make_student(STUDENT, "workbench:tokenizer")
    recs = tone_split("train")[:4]
    with pytest.raises(SlmopsError, match=r"Unknown distillation method 'kd'.*gold_only"):
        train_student("kd", model, tok, recs, DistillConfig(max_steps=1))
    with pytest.raises(SlmopsError, match="max_steps must be at least 1"):
        train_student("seq_kd", model, tok, recs, DistillConfig(max_steps=0))
    with pytest.raises(SlmopsError, match="logit_kd needs the teacher"):
        train_student("logit_kd", model, tok, recs, DistillConfig(max_steps=1))


def test_logit_kd_and_gkd_train_a_student(tok):
    "Both teacher-in-the-loop trainers run for real and move the student's weights."
    teacher, _ = make_student(STUDENT, "workbench:tokenizer", seed=5)
    recs = tone_split("train")[:32]
    for train in (lambda s: train_student("logit_kd", s, tok, recs, DistillConfig(max_steps=4, batch_size=8), teacher),
                  lambda s: train_gkd(s, teacher, tok, recs, TrainConfig(max_steps=4, batch_size=8))):
        student, _ = make_student(STUDENT, "workbench:tokenizer", seed=0)
        before = student.lm_head.weight.detach().clone()
        res = train(student)
        assert res["train_seconds"] > 0 and res["log_history"][-1]["train_loss"] > 0
        assert not torch.equal(before, student.lm_head.weight)


def test_logit_kd_on_cached_teacher_logits_trains_the_student_the_teacher_trains(tmp_path, tok):
    "The teacher's logits saved once (save_answer_logits) train the very student the teacher run at every step trains."
    teacher, _ = make_student(STUDENT, "workbench:tokenizer", seed=5)
    recs = tone_split("train")[:32]
    path = save_answer_logits(teacher, tok, recs, tmp_path/"logits.pt")
    live, cached = make_student(STUDENT, "workbench:tokenizer", seed=0)[0], make_student(STUDENT, "workbench:tokenizer", seed=0)[0]
    a = train_student("logit_kd", live, tok, recs, DistillConfig(max_steps=4, batch_size=8), teacher)
    b = train_student("logit_kd", cached, tok, recs, DistillConfig(max_steps=4, batch_size=8), teacher_logits=load_answer_logits(path))
    assert abs(a["log_history"][-1]["train_loss"] - b["log_history"][-1]["train_loss"]) < 1e-4
    assert torch.allclose(live.lm_head.weight, cached.lm_head.weight, atol=1e-5)
    with pytest.raises(SlmopsError, match="cached for other examples"):
        train_student("logit_kd", cached, tok, recs[:16], DistillConfig(max_steps=1), teacher_logits=load_answer_logits(path))
    assert save_answer_logits(teacher, tok, recs, tmp_path/"big.pt", max_gib=1e-6) is None and not (tmp_path/"big.pt").exists()


def test_students_side_by_side_are_the_students_trained_in_order(tmp_path, tok):
    "train_students in fresh processes (two threads to share) trains the very students one process trains in order, on one thread."
    teacher, _ = make_student(STUDENT, "workbench:tokenizer", seed=5)
    save_model(teacher, tok, tmp_path/"teacher")
    recs, methods, threads = tone_split("train")[:32], ["gold_only", "seq_kd", "logit_kd"], torch.get_num_threads()
    def students(n: int, out: str) -> dict:
        torch.set_num_threads(n)
        try: return train_students(methods, STUDENT, tmp_path/"teacher", {"gold": recs[:8], "synthetic": recs}, tmp_path/out,
                                   DistillConfig(max_steps=3, batch_size=8))
        finally: torch.set_num_threads(threads)
    apart, together = students(2, "apart"), students(1, "together")
    assert list(apart) == methods and apart["logit_kd"]["trainer"] == "DistillTrainer"
    for m in methods:
        assert (tmp_path/"apart"/m/"model.safetensors").exists()
        assert torch.equal(apart[m]["model"].lm_head.weight, together[m]["model"].lm_head.weight), m
    assert not torch.equal(apart["seq_kd"]["model"].lm_head.weight, apart["logit_kd"]["model"].lm_head.weight)
