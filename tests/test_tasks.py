"""Local zero-shot task definitions: each reads its Hugging Face row layout, builds exactly the prompts of
lm-eval's own task of that name, and takes the right choice as gold; the papers' task sets and averages."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from moepress.errors import MoepressError
from moepress.evaluate.lm_eval_bridge import TaskScore, local_tasks
from moepress.evaluate.task_sets import TASK_SETS, missing_task_data, task_set

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval not installed (pip install -e '.[eval]')")

# A few rows per task in the dataset's own layout. Gold indices vary, so a task that read the wrong field
# or built a different prompt would score differently from the expectation below.
ROWS: dict[str, list[dict]] = {
    "boolq": [
        {"question": "is the sky blue", "passage": "The sky is blue.", "label": 1},
        {"question": "is grass red", "passage": "Grass is green.", "label": 0},
        {"question": "do cats purr", "passage": "Cats purr.", "label": 1},
        {"question": "do fish fly", "passage": "Fish swim.", "label": 0},
    ],
    "copa": [
        {"premise": "The man fell.", "choice1": "He slipped.", "choice2": "He sang.", "question": "cause",
         "label": 0},
        {"premise": "It rained.", "choice1": "The sun shone.", "choice2": "The road got wet.",
         "question": "effect", "label": 1},
        {"premise": "The glass broke.", "choice1": "It was dropped.", "choice2": "It was washed.",
         "question": "cause", "label": 0},
        {"premise": "She was hungry.", "choice1": "She slept.", "choice2": "She ate.", "question": "effect",
         "label": 1},
    ],
    "rte": [
        {"sentence1": "A dog runs in the park.", "sentence2": "An animal is outside.", "label": 0},
        {"sentence1": "The shop is closed.", "sentence2": "The shop is open.", "label": 1},
        {"sentence1": "Ann bought a car.", "sentence2": "Ann owns a car.", "label": 0},
        {"sentence1": "Tom is asleep.", "sentence2": "Tom is running.", "label": 1},
    ],
    "openbookqa": [
        {"question_stem": "The sun is a", "choices": {"text": ["star", "planet", "moon", "comet"],
                                                      "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
        {"question_stem": "Water boils at", "choices": {"text": ["0 C", "50 C", "100 C", "200 C"],
                                                        "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
        {"question_stem": "Plants need", "choices": {"text": ["salt", "light", "sand", "oil"],
                                                     "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
        {"question_stem": "Ice is", "choices": {"text": ["hot", "gas", "loud", "frozen water"],
                                                "label": ["A", "B", "C", "D"]}, "answerKey": "D"},
    ],
    "winogrande": [
        {"sentence": "The cup fit in the bag because the _ was small.", "option1": "cup", "option2": "bag",
         "answer": "1"},
        {"sentence": "The cup did not fit in the bag because the _ was small.", "option1": "cup",
         "option2": "bag", "answer": "2"},
        {"sentence": "Ann helped Sue because _ was kind.", "option1": "Ann", "option2": "Sue", "answer": "1"},
        {"sentence": "Ann thanked Sue because _ was kind.", "option1": "Ann", "option2": "Sue", "answer": "2"},
    ],
    "mmlu": [
        {"question": "2 + 2 = ?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"],
         "answer": 1},
        {"question": " Which organ pumps blood?", "subject": "anatomy", "choices": ["lung", "liver", "skin", "heart"],
         "answer": 3},
        {"question": "F = m a is whose law?", "subject": "high_school_physics",
         "choices": ["Newton", "Ohm", "Boyle", "Hooke"], "answer": 0},
        {"question": "Which bone is in the arm?", "subject": "anatomy", "choices": ["femur", "tibia", "humerus",
                                                                                    "skull"], "answer": 2},
    ],
    # the four tasks that were there before, for the comparison with lm-eval's own definitions
    "arc_easy": [
        {"question": "What is hot?", "choices": {"text": ["ice", "fire", "snow"], "label": ["A", "B", "C"]},
         "answerKey": "B"},
        {"question": "What is wet?", "choices": {"text": ["water", "dust"], "label": ["1", "2"]}, "answerKey": "1"},
    ],
    "arc_challenge": [
        {"question": "What melts?", "choices": {"text": ["rock", "ice"], "label": ["A", "B"]}, "answerKey": "B"},
    ],
    "piqa": [{"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0}],
    "hellaswag": [
        {"activity_label": "Cooking", "ctx_a": "A man cuts onions.", "ctx_b": "he", "label": "1",
         "endings": ["sings [title] loudly.", "puts them in a pan.", "flies.", "swims."]},
    ],
}


def gold_and_wrong(task: str, row: dict) -> tuple[tuple[str, str], tuple[str, str]]:
    """The (context, continuation) lm-eval scores for the gold choice and for one wrong choice, written out
    by hand from lm-eval's task definitions."""
    if task == "boolq":
        ctx = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
        return (ctx, [" no", " yes"][row["label"]]), (ctx, [" yes", " no"][row["label"]])
    if task == "copa":
        ctx = row["premise"][:-1] + {"cause": " because", "effect": " therefore"}[row["question"]]
        # lm-eval's choices start with a space and it adds its target delimiter, another space
        options = ["  " + row[c][0].lower() + row[c][1:] for c in ("choice1", "choice2")]
        return (ctx, options[row["label"]]), (ctx, options[1 - row["label"]])
    if task == "rte":
        ctx = f"{row['sentence1']}\nQuestion: {row['sentence2']} True or False?\nAnswer:"
        return (ctx, [" True", " False"][row["label"]]), (ctx, [" False", " True"][row["label"]])
    if task == "openbookqa":
        gold = row["choices"]["label"].index(row["answerKey"])
        texts = row["choices"]["text"]
        return (row["question_stem"], " " + texts[gold]), (row["question_stem"], " " + texts[gold - 1])
    if task == "winogrande":
        before, after = row["sentence"].split("_")
        gold = int(row["answer"]) - 1
        options = [row["option1"], row["option2"]]
        rest = " " + after.strip()  # the shared continuation, after lm-eval's target delimiter
        return (before + options[gold], rest), (before + options[1 - gold], rest)
    if task == "mmlu":
        subject = row["subject"].replace("_", " ")
        letters = "ABCD"
        ctx = (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
               + row["question"].strip() + "".join(f"\n{letters[i]}. {c}" for i, c in enumerate(row["choices"]))
               + "\nAnswer:")
        return (ctx, f" {letters[row['answer']]}"), (ctx, f" {letters[row['answer'] - 1]}")
    raise KeyError(task)


NEW_TASKS = ["boolq", "copa", "rte", "openbookqa", "winogrande", "mmlu"]


@pytest.fixture(autouse=True)
def no_env_report(monkeypatch):
    """lm-eval collects an environment report (pip, nvidia-smi: seconds of subprocesses) on every run."""
    if HAS_LM_EVAL:
        monkeypatch.setattr("lm_eval.evaluator.add_env_info", lambda results: None)


def write_rows(folder: Path, tasks=None) -> Path:
    for task in tasks or ROWS:
        (folder / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[task]))
    return folder


def rigged_lm(prefer: set[tuple[str, str]]):
    """An lm-eval model whose log-likelihood is 0 for the (context, continuation) pairs in `prefer` and
    -10 for any other, and which records every request it is asked about."""
    from lm_eval.api.model import LM

    class Rigged(LM):
        def __init__(self):
            super().__init__()
            self.seen: list[tuple[str, tuple[str, str]]] = []

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self.seen += [(r.task_name, tuple(r.args)) for r in requests]
            return [(0.0 if tuple(r.args) in prefer else -10.0, False) for r in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

    return Rigged()


def test_every_paper_task_has_a_local_definition():
    wanted = {t for s in TASK_SETS.values() for t in s.tasks}
    assert wanted <= set(local_tasks())
    assert len(TASK_SETS["mone"].tasks) == 9 and len(TASK_SETS["cd-moe"].tasks) == 8


@needs_lm_eval
def test_new_tasks_read_the_row_layout_and_take_the_right_gold(tmp_path):
    from moepress.evaluate.lm_eval_bridge import run_tasks

    # the model knows the answer to every row but the last, where it prefers a wrong choice: 3 of 4 right
    prefer = set()
    for task in NEW_TASKS:
        rows = ROWS[task]
        prefer |= {gold_and_wrong(task, r)[0] for r in rows[:-1]} | {gold_and_wrong(task, rows[-1])[1]}
    lm = rigged_lm(prefer)
    scores = run_tasks(lm, None, NEW_TASKS, data_dir=write_rows(tmp_path, NEW_TASKS))
    for task in NEW_TASKS:
        s = scores[f"{task}_local"]
        assert (task, s.acc, s.samples) == (task, 0.75, 4)
        assert s.acc_norm == (0.75 if task == "openbookqa" else None)
    asked = {args for _, args in lm.seen}
    assert all(p in asked for p in prefer)  # every hand-written prompt was asked, none is unmatched


@needs_lm_eval
def test_rte_reads_the_superglue_layout_too(tmp_path):
    from moepress.evaluate.lm_eval_bridge import run_tasks

    rows = [{"premise": r["sentence1"], "hypothesis": r["sentence2"], "label": r["label"], "idx": i}
            for i, r in enumerate(ROWS["rte"])]
    (tmp_path / "sglue_rte.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefer = {gold_and_wrong("rte", r)[0] for r in ROWS["rte"]}
    s = run_tasks(rigged_lm(prefer), None, ["rte"], data_files={"rte": tmp_path / "sglue_rte.jsonl"})["rte_local"]
    assert (s.acc, s.samples) == (1.0, 4)


@needs_lm_eval
def test_local_tasks_build_the_prompts_of_lm_evals_own_tasks(tmp_path):
    """Our YAML against lm-eval's installed one, fed the same rows: the same requests, in the same order."""
    import lm_eval
    import yaml
    from lm_eval.tasks import TaskManager

    from moepress.evaluate.lm_eval_bridge import write_task_files

    own = Path(lm_eval.__file__).parent / "tasks"
    reference = {
        "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml", "piqa": "piqa/piqa.yaml",
        "hellaswag": "hellaswag/hellaswag.yaml", "boolq": "super_glue/boolq/default.yaml",
        "copa": "super_glue/copa/default.yaml", "rte": "glue/rte/default.yaml",
        "openbookqa": "openbookqa/openbookqa.yaml", "winogrande": "winogrande/default.yaml",
        "mmlu": "mmlu/default/mmlu_anatomy.yaml",
    }
    data, ours, theirs = (tmp_path / d for d in ("data", "ours", "theirs"))
    for d in (data, ours, theirs):
        d.mkdir()
    rows = {**ROWS, "mmlu": [r for r in ROWS["mmlu"] if r["subject"] == "anatomy"]}
    for task, task_rows in rows.items():
        (data / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task_rows))
    write_task_files(list(reference), ours, data_dir=data)
    for task, path in reference.items():
        f = str(data / f"{task}.jsonl")
        spec = {"include": str(own / path), "task": f"ref_{task}", "dataset_path": "json", "dataset_name": None,
                # every split lm-eval might look for is the same file
                "dataset_kwargs": {"data_files": {s: f for s in ("train", "validation", "test", "dev")}}}
        (theirs / f"ref_{task}.yaml").write_text(yaml.safe_dump(spec))
    manager = TaskManager(include_path=[str(ours), str(theirs)], include_defaults=False)
    names = [f"{t}_local" for t in reference] + [f"ref_{t}" for t in reference]
    lm = rigged_lm(set())
    lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=0, task_manager=manager, bootstrap_iters=0)
    by_task: dict[str, list] = {}
    for name, args in lm.seen:
        by_task.setdefault(name, []).append(args)
    for task in reference:
        assert by_task[f"{task}_local"] == by_task[f"ref_{task}"], task
        assert len(by_task[f"{task}_local"]) >= len(rows[task]) * 2


def score(acc: float | None, acc_norm: float | None) -> TaskScore:
    return TaskScore("t", acc, acc_norm, None, None, 4, None)


def test_task_set_average_uses_each_papers_metric():
    mone = task_set("MoNE")
    assert mone is TASK_SETS["mone"] and task_set("cd_moe") is TASK_SETS["cd-moe"]
    norm = {"arc_challenge", "arc_easy", "openbookqa", "piqa"}
    assert {t for t, m in mone.metrics.items() if m == "acc_norm"} == norm
    scores = {f"{t}_local": score(0.1, 0.5) if t in norm else score(0.2, None) for t in mone.tasks}
    assert mone.average(scores) == pytest.approx((4 * 0.5 + 5 * 0.2) / 9)
    cd = TASK_SETS["cd-moe"]
    assert {t for t, m in cd.metrics.items() if m == "acc_norm"} == {"arc_challenge", "openbookqa", "piqa",
                                                                      "hellaswag"}
    del scores["mmlu_local"]
    assert mone.average(scores) is None  # an incomplete set has no paper average
    assert mone.metric_summary().startswith("acc_norm: arc_challenge, arc_easy, openbookqa, piqa; acc: boolq")
    with pytest.raises(MoepressError, match="cd-moe, mone"):
        task_set("moe")


def test_missing_task_files_are_listed_together(tmp_path, monkeypatch):
    monkeypatch.delenv("MOEPRESS_TASK_DATA", raising=False)
    write_rows(tmp_path, ["piqa", "hellaswag", "boolq"])
    with pytest.raises(MoepressError, match=r"arc_challenge\.jsonl, rte\.jsonl, openbookqa\.jsonl, winogrande"):
        missing_task_data(TASK_SETS["cd-moe"].tasks, tmp_path)
    missing_task_data(["piqa", "boolq_local", "some_lm_eval_task"], tmp_path)
    with pytest.raises(MoepressError, match="--task-data"):
        missing_task_data(["piqa"], None)


def test_cli_task_set_checks_data_before_loading_a_model(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from moepress.cli import app

    from .conftest import mini_model_path

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the task data was checked")

    monkeypatch.setattr("moepress.evaluate.output._load_pair", no_loading)
    write_rows(tmp_path, ["piqa", "hellaswag"])
    model = str(mini_model_path("dsv2-mini"))
    res = CliRunner().invoke(app, ["eval", model, "--task-set", "mone", "--task-data", str(tmp_path)])
    assert isinstance(res.exception, MoepressError), res.output
    assert "arc_challenge.jsonl, arc_easy.jsonl, boolq.jsonl, copa.jsonl, mmlu.jsonl" in str(res.exception)
    res = CliRunner().invoke(app, ["eval", model, "--task-set", "nope"])
    assert isinstance(res.exception, MoepressError) and "cd-moe, mone" in str(res.exception)


@needs_lm_eval
def test_evaluate_pair_runs_a_task_set_on_both_models(tmp_path):
    from moepress.evaluate import evaluate_pair
    from moepress.testing import tiny_model

    from .test_evaluate import word_tokenizer

    tokenizer = word_tokenizer(["[PAD]", "[UNK]", "<s>", "</s>", "Question", ":", "Answer", "?", "the", "is"])
    ids = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)
    small = {t: ROWS[t][:2] for t in TASK_SETS["mone"].tasks}
    for task, rows in small.items():
        (tmp_path / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = evaluate_pair(tiny_model("qwen2_moe", **ids), tiny_model("qwen2_moe", seed=1, **ids), tokenizer,
                        task_set="mone", task_data=tmp_path, batch_size=8)
    json.dumps(out)
    avg = out["task_set"]["average"]
    assert out["task_set"]["name"] == "mone" and avg["original"] is not None and avg["compressed"] is not None
    rows = {r["metric"]: r for r in out["rows"]}
    assert rows["mone average (paper's metric per task)"]["compressed"] == pytest.approx(avg["compressed"])
    assert len(out["tasks"]["compressed"]) == 9
