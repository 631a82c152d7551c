"""`mdu push`: publish an unlearned checkpoint with its model card, never the data."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mdu_cli.commands import FiniteFloatRange

EXAMPLES = """
\b
Examples:
  # See exactly what would be uploaded, and what stays behind
  mdu push ./LLaDA-8B-Instruct-mdu-tau2 --repo-id me/llada-forgot-x --dry-run
\b
  # Publish as a private repo
  mdu push ./LLaDA-8B-Instruct-mdu-tau2 --repo-id me/llada-forgot-x --private
\b
  # Propose it as a pull request to an organisation's repo
  mdu push ./out --repo-id my-org/llada-forgot-x --create-pr --commit-message "Forget set v2"
\b
  # A slow link: wait up to five minutes for each Hub answer
  mdu push ./out --repo-id me/llada-forgot-x --timeout 300
"""


@click.command(epilog=EXAMPLES)
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--repo-id", required=True, help="OWNER/NAME of the model repo (created if missing).")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--revision", help="Branch to push to (created if missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing directly.")
@click.option("--commit-message", help="Commit message.  [default: names the base and tau]")
@click.option("--token", help="Hub token; default: HF_TOKEN or the `hf auth login` cache. Never printed.")
@click.option("--regenerate-card", is_flag=True, help="Replace a README.md you wrote with the generated card.")
@click.option("--include-local-paths", is_flag=True,
              help="Publish mdu_run.json, the delta report and eval.json as they are, with the local paths and "
                   "file names they record (by default these are taken out, and a push that would still publish "
                   "one is refused).")
@click.option("--dry-run", is_flag=True, help="Print the upload plan and touch no network.")
@click.option("--timeout", type=FiniteFloatRange(min=0, min_open=True),
              help="Seconds to wait for the Hub to connect or answer each request.  [default: MDU_HUB_TIMEOUT or 60]")
@click.option("--json", "as_json", is_flag=True, help="Print the plan (and result) as one JSON document.")
def push(directory, repo_id, private, revision, create_pr, commit_message, token, regenerate_card,
         include_local_paths, dry_run, timeout, as_json) -> None:
    """Upload an `mdu unlearn` output DIRECTORY to the Hugging Face Hub.

    Only the model and its paperwork go up: weights and index, config,
    generation config, tokenizer files, remote-code .py files, the model card
    (README.md, regenerated from mdu_run.json, the delta report and eval.json),
    mdu_run.json and the delta report, these with every local path and file
    name taken out. Data files, logs and hidden files stay behind. The same
    commit deletes the revision's model files (weights, index, adapter,
    config, code, tokenizer, reports) that this output does not have, so the
    revision holds exactly this model. Nothing in DIRECTORY is changed.
    Re-running the same command resumes an interrupted upload.
    """
    from mdu_cli.errors import printable
    from mdu_cli.hub.upload import check_output_dir, plan_upload, validate_repo_id
    from mdu_cli.hub.upload import push as run_push
    from mdu_cli.io.output_location import human_size

    problem = validate_repo_id(repo_id)
    if problem:
        raise click.BadParameter(problem, param_hint="--repo-id")
    if dry_run:
        _, weights = check_output_dir(directory)
        plan = plan_upload(directory, weights, regenerate_card, repo_id, include_local_paths)
        if as_json:
            click.echo(json.dumps(plan.as_dict(), indent=2))
            return
        click.echo(f"Would upload to {repo_id}" + (" (private)" if private else "") + ":")
        for entry in plan.upload:
            note = "  (card, regenerated)" if entry["path"] == "README.md" and plan.card == "write" else ""
            if entry.get("local_paths") == "removed":
                note = "  (local paths taken out)"
            if "link_to" in entry:
                note = f"  (read through the link to {printable(entry['link_to'])})"
            click.echo(f"  {human_size(entry['size']):>9}  {printable(entry['path'])}{note}")
        click.echo("Left behind:" if plan.skip else "Left behind: nothing")
        for entry in plan.skip:
            click.echo(f"  {human_size(entry['size']):>9}  {printable(entry['path'])}  ({entry['reason']})")
        click.echo("Deleted from the revision in the same commit: its weight, index, adapter, config, code, "
                   "tokenizer and report files that are not uploaded here (listed when pushing)")
        return

    result = run_push(directory, repo_id, private=private, revision=revision, create_pr=create_pr,
                      commit_message=commit_message, token=token, regenerate_card=regenerate_card, timeout=timeout,
                      include_local_paths=include_local_paths)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    click.echo(f"Uploaded {len(result.plan.upload)} files to {result.repo_url}")
    if result.plan.delete:
        click.echo(f"Deleted {len(result.plan.delete)} stale files: "
                   + ", ".join(printable(path) for path in result.plan.delete))
    if result.pr_url:
        click.echo(f"Pull request: {result.pr_url}")
