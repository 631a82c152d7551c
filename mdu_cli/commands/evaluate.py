"""`mdu eval` and `mdu generate`: measure forgetting, or look at a completion."""

from __future__ import annotations

import json

import click

from mdu_cli.commands import FiniteFloatRange
from mdu_cli.config.choices import DEVICES, ORDERINGS
from mdu_cli.config.generation import PRESETS
from mdu_cli.config.generation import requested as _generation
from mdu_cli.evaluation.benchmarks import BENCHMARKS

EVAL_EXAMPLES = """
\b
Examples:
  # The unlearned model against its base, on both splits
  mdu eval ./LLaDA-8B-Instruct-mdu-tau2 --forget forget.jsonl --retain retain.jsonl \\
      --base GSAI-ML/LLaDA-8B-Instruct
\b
  # A quick look: 20 records, fewer samples, short generations
  mdu eval ./out --forget forget.jsonl --limit 20 --mc-samples 32 --max-new-tokens 32 --steps 32
\b
  # TOFU forget10 from the Hub: first the retain-only reference, then the unlearned model
  mdu eval ./llada-tofu-retain90 --benchmark tofu --preset paper --json > retain90.json
  mdu eval ./llada-tofu-mdu --benchmark tofu --preset paper --reference retain90.json
\b
  # RWKU: one real person, the unlearned model beside the original
  mdu eval ./dream-forgot-stephen-king --benchmark rwku --target "Stephen King" \\
      --base Dream-org/Dream-v0-Instruct-7B
"""

GENERATE_EXAMPLES = """
\b
Examples:
  mdu generate GSAI-ML/LLaDA-8B-Instruct --prompt "Who wrote The Green Mountain?"
  mdu generate ./out --prompt "Where was Astrid Halvorsen born?" --max-new-tokens 32 --steps 32
"""


def _generation_options(function):
    for option in reversed([
        click.option("--max-new-tokens", type=click.IntRange(min=0),
                     help="Length of the generated answer (0 skips generation in eval).  [default: 128; "
                     "--benchmark rwku: each part's own]"),
        click.option("--steps", type=click.IntRange(min=1), help="Denoising steps over all blocks.  [default: 128; "
                     "--benchmark rwku: one per new token]"),
        click.option("--block-length", type=click.IntRange(min=1),
                     help="Tokens filled per block, left to right.  [default: 32]"),
        click.option("--ordering", type=click.Choice(ORDERINGS),
                     help="Which predictions are committed first: confidence (LLaDA's low-confidence remasking) "
                     "or entropy (Dream's).  [default: confidence]"),
        click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True),
        click.option("--trust-remote-code", is_flag=True, help="Allow remote code outside the known publishers."),
    ]):
        function = option(function)
    return function


def _benchmark_options(function):
    """--benchmark and each registered benchmark's own options, from its entry
    (mdu_cli/evaluation/benchmarks/)."""
    options = [click.option("--benchmark", type=click.Choice(tuple(BENCHMARKS)),
                            help=" ".join(entry.summary for entry in BENCHMARKS.values()))]
    for entry in BENCHMARKS.values():
        for option in entry.options:
            kind = click.Path(dir_okay=False) if option.is_file else (
                click.Choice(option.choices) if option.choices else None)
            options.append(click.option(option.flag, option.name, type=kind, multiple=option.multiple,
                                        default=() if option.multiple else option.default,
                                        show_default=option.default is not None, help=option.help))
    for option in reversed(options):
        function = option(function)
    return function


@click.command("eval", epilog=EVAL_EXAMPLES)
@click.argument("model")
@click.option("--forget", help="Forget records (JSONL, JSON array or hf://datasets/...).  [required without "
              "--benchmark]")
@click.option("--retain", help="Retain records.")
@_benchmark_options
@click.option("--base", help="A second model (the base) to show side by side, with the change.")
@click.option("--tasks", help="lm-evaluation-harness tasks, comma-separated (e.g. mmlu,truthfulqa_mc1,triviaqa), "
              "run through the masked-diffusion `mdu` model; alone or beside the other measures. Needs "
              "pip install 'mdu-cli[lm-eval]'.")
@click.option("--num-fewshot", type=click.IntRange(min=0), help="With --tasks: few-shot examples per prompt.  "
              "[default: each task's own]")
@click.option("--include-path", type=click.Path(file_okay=False), help="With --tasks: a folder of your own lm-eval "
              "task configs.")
@click.option("--apply-chat-template", is_flag=True, help="With --tasks: put each prompt through the model's chat "
              "template (lm-eval's option of the same name).")
# 128 still: the stratified estimator at 64 samples is noisier than the former
# one at 128 on texts of 13-18 tokens (benchmarks/eval_cost.py, docs/benchmarks.md).
@click.option("--mc-samples", type=click.IntRange(min=1), default=128, show_default=True,
              help="Monte Carlo samples per answer probability.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Samples per forward.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N records of each split.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@click.option("--preset", type=click.Choice(tuple(PRESETS)),
              help="Generation settings of the paper's evaluation for the model's family (LLaDA: 256 tokens, "
              "blocks of 128, 256 steps; Dream: one block, entropy ordering); explicit options win. With "
              "--benchmark rwku: the MDU paper's variant of RWKU (raw queries, 64 tokens).")
@_generation_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document; no progress bars.")
def eval_command(model, forget, retain, benchmark, base, tasks, num_fewshot, include_path, apply_chat_template,
                 mc_samples, batch_size, limit, seed, preset, max_new_tokens, steps, block_length, ordering, device,
                 trust_remote_code, as_json, **benchmark_options) -> None:
    """Measure forgetting: answer probability, ROUGE-L and truth ratio per split.

    Answer probability is the Monte Carlo estimator of masked diffusion LMs
    (mask l ~ U{1..L} answer tokens, score the mean cross-entropy, exp(-mean));
    ROUGE-L recall compares greedy generations with the gold answers; the truth
    ratio needs records with a "perturbed_answer" list. With --benchmark tofu,
    TOFU's forget quality (KS test against --reference) and model utility
    (harmonic mean over retain, real authors and world facts) head the report.
    With --benchmark rwku --target NAME, RWKU's evaluation of one person:
    forget probes (levels 1-3), neighbor probes, membership inference and
    utility, by RWKU's definitions (--preset paper: the MDU paper's).
    With --tasks, lm-evaluation-harness tasks run through the `mdu` model
    (masked-diffusion likelihoods, the sampler for generation), alone or
    beside the rest. When MODEL is an `mdu` output, the report is also
    written there as eval.json, and `mdu push` puts it in the model card.
    """
    from mdu_cli.evaluation.report import format_eval, run_eval

    if not tasks and (num_fewshot is not None or include_path or apply_chat_template):
        raise click.UsageError("--num-fewshot, --include-path and --apply-chat-template need --tasks")
    if tasks:
        from mdu_cli.evaluation.harness import parse_tasks

        tasks = parse_tasks(tasks)

    options = {}
    for name, entry in BENCHMARKS.items():
        for option in entry.options:
            value = benchmark_options[option.name]
            if name == benchmark:
                options[option.name] = value
            elif value not in (None, ()) and value != option.default:
                raise click.UsageError(f"{option.flag} needs --benchmark {name}")
    given = {"max_new_tokens": max_new_tokens, "steps": steps, "block_length": block_length, "ordering": ordering}
    if benchmark and getattr(BENCHMARKS[benchmark], "own_generation", False):
        generation = {"preset": preset, **{k: v for k, v in given.items() if v is not None}}
    else:
        generation = _generation(preset, **given)
    report = run_eval(model, forget, retain, base, mc_samples=mc_samples, limit=limit, seed=seed,
                      generation=generation, batch_size=batch_size, device=device,
                      trust_remote_code=trust_remote_code, show_progress=not as_json, benchmark=benchmark,
                      tasks=tasks, num_fewshot=num_fewshot, include_path=include_path,
                      apply_chat_template=apply_chat_template, **options)
    click.echo(json.dumps(report, indent=2) if as_json else format_eval(report))


@click.command("generate", epilog=GENERATE_EXAMPLES)
@click.argument("model")
@click.option("--prompt", required=True, help="The user turn; the chat template is applied.")
@click.option("--temperature", type=FiniteFloatRange(min=0), default=0.0, show_default=True, help="0 is greedy.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@_generation_options
def generate_command(model, prompt, temperature, seed, max_new_tokens, steps, block_length, ordering, device,
                     trust_remote_code) -> None:
    """Print the model's completion of PROMPT (low-confidence remasking)."""
    import torch

    from mdu_cli.model.inference import prepare_inference
    from mdu_cli.model.sampling import generate

    settings = _generation(None, max_new_tokens=max_new_tokens, steps=steps, block_length=block_length,
                           ordering=ordering)
    max_new_tokens = settings["max_new_tokens"]
    if max_new_tokens < 1:
        raise click.BadParameter("must be >= 1", param_hint="--max-new-tokens")
    loaded = prepare_inference(model, trust_remote_code=trust_remote_code, device=device)
    prompt_ids = loaded.prompt_ids([{"role": "user", "content": prompt}], where="--prompt")
    loaded.check_length(len(prompt_ids) + max_new_tokens, "--prompt", f"the prompt with --max-new-tokens "
                        f"{max_new_tokens}")
    loaded.load_weights()
    [new_ids] = generate(loaded.model, loaded.family, loaded.mask_token_id, [prompt_ids],
                         **settings, temperature=temperature, pad_id=loaded.pad_id, stop_ids=loaded.stop_ids(),
                         generator=torch.Generator().manual_seed(seed))
    click.echo(loaded.tokenizer.decode(new_ids, skip_special_tokens=True).strip())
