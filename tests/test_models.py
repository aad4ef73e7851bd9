import torch

from dpq.models import build_model, student_from_teacher


def test_student_copies_the_chosen_teacher_layers(make_cfg):
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(
        make_cfg("experiment=tiny", "teacher.config.num_hidden_layers=4"), resolve=True
    )
    teacher = build_model(cfg["teacher"], cfg["task"], "teacher")
    student = student_from_teacher(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(
        s["bert.encoder.layer.1.output.dense.weight"], t["bert.encoder.layer.3.output.dense.weight"]
    )
    assert torch.equal(
        s["bert.encoder.layer.0.attention.self.query.weight"],
        t["bert.encoder.layer.0.attention.self.query.weight"],
    )
    assert torch.equal(s["classifier.weight"], t["classifier.weight"])
    assert torch.equal(
        s["bert.embeddings.word_embeddings.weight"], t["bert.embeddings.word_embeddings.weight"]
    )
    # a teacher saved with transformers' placeholder names: the student predicts the task's names
    teacher.config.id2label = {i: f"LABEL_{i}" for i in range(teacher.config.num_labels)}
    spec = {**cfg["model"], "arch": "hf", "init": "from_teacher", "layers": [0, 3]}
    task = {**cfg["task"], "label_names": ["negative", "positive"], "num_labels": 2}
    named = build_model(spec, task, "model", teacher=teacher)
    assert named.config.id2label == {0: "negative", 1: "positive"}
    assert named.config.label2id == {"negative": 0, "positive": 1}


def test_every_kth_layer_and_bad_layer_specs():
    import pytest

    from dpq.core.errors import ConfigError
    from dpq.models import resolve_layers

    assert resolve_layers("every_2", 6) == [0, 2, 4]
    assert resolve_layers("every_3", 12) == [0, 3, 6, 9]
    assert resolve_layers([1, 5], 6) == [1, 5]
    with pytest.raises(ConfigError, match="every_<k>"):
        resolve_layers("every_x", 6)


def test_a_bf16_teacher_folder_loads_as_float32_and_its_copied_student_trains_in_float32(tmp_path):
    """transformers 5 loads a folder in its saved dtype: a bf16 load_from teacher made the from_teacher
    student bf16 too (config.dtype copied), where most small AdamW updates round away."""
    import transformers

    from dpq.models import load_model

    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    transformers.BertForSequenceClassification(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    teacher = load_model({}, {}, tmp_path / "bf16")
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}
    teacher.to(torch.bfloat16)  # a teacher that computes in bf16 whatever brought it
    student = student_from_teacher(teacher, [1])
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    assert student.config.dtype == torch.float32


def test_a_random_model_of_a_bf16_base_config_trains_in_float32(tmp_path):
    """from_config took the base config's dtype: a random student of a bf16 folder trained in bf16, while
    every other way of building a model loads float32."""
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    transformers.BertForSequenceClassification(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    task = {"name": "t", "kind": "text", "num_labels": 2, "label_names": ["neg", "pos"]}
    model = build_model({"arch": "hf", "init": "random", "base_config": str(tmp_path)}, task, "model")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
