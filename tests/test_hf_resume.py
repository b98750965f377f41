"""NMOptimTrainerCallback in a real transformers Trainer (a 2-layer BERT built from a config, no
download): a run stopped at a checkpoint and resumed with ``train(resume_from_checkpoint=True)``
has the record of a run never stopped, and the TensorBoard events the Trainer's `report_to`
integration wrote hold every nm_optim scalar once per logged step (``logging_steps``), with the
uninterrupted run's values; none of them reaches the console or the log history."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import nm_optim
from helpers import assert_same_record

transformers = pytest.importorskip("transformers")
pytest.importorskip("tensorboard")
pytest.importorskip("accelerate")  # transformers.Trainer needs it
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from nm_optim.integrations.huggingface import RECORDER_NAME, NMOptimTrainerCallback  # noqa: E402

STEPS, STOP, LOGGING_STEPS = 12, 6, 3


class Data(torch.utils.data.Dataset):
    def __init__(self, n=32, length=8):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 40, (n, length), generator=gen)
        self.labels = (self.ids[:, 0] % 2).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def trainer_for(out, callbacks=()):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=2)
    model = BertForSequenceClassification(config)
    opt = nm_optim.SGD(model.named_parameters(), lr=0.05, momentum=0.9, track="layers")
    args = TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, logging_steps=LOGGING_STEPS,
        save_steps=STOP, report_to=["tensorboard"], use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0, save_only_model=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Data(), optimizers=(opt, None), callbacks=list(callbacks))
    NMOptimTrainerCallback.attach(trainer)
    return trainer, opt


def events(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar event in the folder's event files, as written (no purge, no dedup):
    tag -> [(step, value)] in file order."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for v in event.summary.value:
                value = v.simple_value if v.HasField("simple_value") else float(np.asarray(
                    v.tensor.float_val or [np.nan])[0])
                out.setdefault(v.tag, []).append((event.step, value))
    return out


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_stopped_and_resumed_train_has_the_uninterrupted_record_and_logs_each_step_once(tmp_path, capsys):
    trainer, whole = trainer_for(tmp_path / "whole")
    trainer.train()
    trainer, opt = trainer_for(tmp_path / "parts", [StopAt(STOP)])
    trainer.train()
    assert opt.recorder.steps_done == STOP and (tmp_path / "parts" / f"checkpoint-{STOP}" / RECORDER_NAME).is_file()
    trainer, opt = trainer_for(tmp_path / "parts")
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == STEPS and opt.recorder.steps_done == STEPS
    assert_same_record(whole.recorder.snapshot(), opt.recorder.snapshot())

    want, got = events(tmp_path / "whole" / "runs"), events(tmp_path / "parts" / "runs")
    tags = {t for t in want if "nm_optim/" in t}
    assert any("nm_optim/norm/theta/" in t for t in tags) and any("nm_optim/hyper/lr" in t for t in tags)
    assert {t for t in got if "nm_optim/" in t} == tags
    for tag in sorted(tags) + ["train/loss"]:
        steps = [s for s, _ in got[tag]]
        assert len(steps) == len(set(steps)), f"{tag} logged twice at a step: {steps}"
        assert got[tag] == want[tag], tag
    assert [s for s, _ in got["train/nm_optim/hyper/lr"]] == list(range(LOGGING_STEPS, STEPS + 1, LOGGING_STEPS))

    # item 9: the console printer prints the loss, and no nm_optim scalar; the log history
    # (trainer_state.json, in every checkpoint) holds none either
    printed = capsys.readouterr()
    assert "'loss'" in printed.out and "nm_optim" not in printed.out + printed.err
    assert not any("nm_optim" in k for entry in trainer.state.log_history for k in entry)
    state = json.loads((tmp_path / "parts" / f"checkpoint-{STOP}" / "trainer_state.json").read_text())
    assert not any("nm_optim" in k for entry in state["log_history"] for k in entry)


def test_a_resume_without_the_recorder_state_is_refused(tmp_path):
    trainer, _ = trainer_for(tmp_path, [StopAt(STOP)])
    trainer.train()
    (tmp_path / f"checkpoint-{STOP}" / RECORDER_NAME).unlink()
    trainer, _ = trainer_for(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"resumed at global step {STOP}.*{RECORDER_NAME}"):
        trainer.train(resume_from_checkpoint=True)
