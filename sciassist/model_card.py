"""The model card (README.md) of an exported folder: what the model is, how it was fine-tuned,
how to load and sample it, and the run's own evaluation when it has one (sciassist.export)."""

import json
from pathlib import Path


def _cell(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def _table_from_results(table: dict) -> str | None:
    """Markdown of results.json's "table" (the shape sciassist.eval.table writes), or None."""
    try:
        columns = list(table["columns"])
        lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns),
                 "| questions | " + " | ".join(str(table["counts"][c]) for c in columns) + " |"]
        for row in table["rows"]:
            cells = []
            for c in columns:
                accuracy = row["cells"][c]["accuracy"]
                cells.append("n/a" if accuracy is None else f"{accuracy:.2f}")
            lines.append(f"| {_cell(row['name'])} | " + " | ".join(cells) + " |")
        return "\n".join(lines)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def evaluation_of(checkpoint_dir: Path) -> dict | None:
    """The run's evaluation (eval/ of the checkpoint folder, as --eval_after or sciassist_evaluate.py
    --out_dir RUN/eval write it): {"table": markdown, "source": file, "settings": {...}} or None."""
    eval_dir = Path(checkpoint_dir) / "eval"
    results = {}
    if (eval_dir / "results.json").is_file():
        try:
            results = json.loads((eval_dir / "results.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            results = {}
        if not isinstance(results, dict):
            results = {}
    settings = results.get("settings") if isinstance(results.get("settings"), dict) else {}
    shown = {k: settings[k] for k in ("split", "scoring", "answer_format", "prompt_style", "limit") if k in settings}
    if (eval_dir / "table.md").is_file():
        table = (eval_dir / "table.md").read_text(encoding="utf-8").strip()
        if table:
            return {"table": table, "source": "eval/table.md", "settings": shown}
    if isinstance(results.get("table"), dict):
        table = _table_from_results(results["table"])
        if table:
            return {"table": table, "source": "eval/results.json", "settings": shown}
    return None


def model_card(loaded, dtype: str, repo_id: str | None, num_params: int, sampling: dict) -> str:
    """README.md: what the model is, how to use it, how it was trained and how it scored."""
    choice, meta, config = loaded.choice, loaded.meta, loaded.model.config
    name = repo_id or choice.name
    load_name = repo_id or "HF_DIR"
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- nanochat",
        "- sciassist",
        "---",
        "",
        f"# {name}",
        "",
        f"A nanochat GPT ({config.n_layer} layers, width {config.n_embd}, {config.n_head} heads, "
        f"{num_params:,} parameters, vocabulary {config.vocab_size:,}, context {config.sequence_len}) exported "
        f"by SciAssist (`python -m sciassist.export`) from {choice.describe()}, weights in {dtype}. It loads "
        f"with transformers' own NanoChat architecture (transformers >= 5.0), no custom code.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'chat = pipeline("text-generation", model="{load_name}")',
        'messages = [{"role": "user", "content": "Why does ice float on water?"}]',
        'print(chat(messages, max_new_tokens=128)[0]["generated_text"][-1]["content"])',
        "```",
        "",
        f"Serving: `vllm serve {load_name}` (an OpenAI-compatible server; not tried by the exporter).",
        "",
        "The chat template renders exactly what nanochat trains on: `<|bos|>`, then each user turn as "
        "`<|user_start|>...<|user_end|>` and each assistant turn as `<|assistant_start|>...<|assistant_end|>`; "
        "a leading system message is put before the first user message as system + \"\\n\\n\" + user. "
        "Generation stops at `<|assistant_end|>` (or `<|bos|>`). The sampling defaults in "
        f"generation_config.json are the SciAssist chat's (temperature {sampling['temperature']}, "
        f"top-k {sampling['top_k']}); pass `do_sample=False` for greedy answers.",
        "",
        "Text that spells a special token (`<|user_end|>`) becomes that token in `tokenizer(text)`, as in every "
        "Hugging Face tokenizer; nanochat never does this. Use `tokenizer(text, split_special_tokens=True)` and "
        "`apply_chat_template(..., sanitize_control_tokens=True)` on untrusted text. That keyword needs transformers "
        ">= 5.20: older releases (Colab's 5.15 among them) accept it and silently ignore it, so there remove "
        "special-token text from untrusted messages before applying the template.",
        "",
        "Numerics: the weights are nanochat's, unchanged. nanochat rounds its rotary cos/sin tables to bf16 "
        "while transformers keeps them in fp32, so logits differ slightly from nanochat's own code (3e-4 to 8e-3 "
        "on the small models the exporter was tested with; greedy text was the same on every test prompt).",
        "",
        "## Source",
        "",
        "| | |",
        "|---|---|",
        f"| checkpoint | `{_cell(str(choice.checkpoint_dir))}` |",
        f"| step | {choice.step} |",
    ]
    for key in ("val_loss", "best_val_loss", "val_bpb", "source_model", "source_step", "answer_format",
                "mmlu_acc", "arc_easy_acc"):
        if key in meta and meta[key] is not None:
            lines.append(f"| {key} | {_cell(meta[key])} |")
    training = meta.get("training_settings")
    if isinstance(training, dict) and training:
        lines += ["", "## Training settings", "", "The fine-tuning run's settings (`sciassist_train.py` flags):", "",
                  "| setting | value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in training.items()]
    evaluation = evaluation_of(choice.checkpoint_dir)
    if evaluation is not None:
        how = ", ".join(f"{k} {_cell(v)}" for k, v in evaluation["settings"].items())
        lines += ["", "## Evaluation", "",
                  f"ScienceQA-style multiple choice, accuracy in % (from the run's `{evaluation['source']}`"
                  + (f"; {how}" if how else "") + "):", "", evaluation["table"]]
    lines += ["", "## Licence", "",
              "nanochat's code and published weights are MIT-licensed. ScienceQA (used by SciAssist's default "
              "training data) is CC BY-NC-SA 4.0; check the terms of the data this model was trained on before "
              "publishing it.", ""]
    return "\n".join(lines)
