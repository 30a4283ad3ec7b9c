"""itera-run: generate text from a bundle, without torch.

    itera-run BUNDLE --prompt "To be" --max-new-tokens 64
    echo "To be" | itera-run BUNDLE --temperature 0.8 --top-k 40 --seed 1 --json
    itera-run BUNDLE            # stdin is a terminal: interactive, the text carrying over from line to line
    printf 'To be\nor not\n' | itera-run BUNDLE --interactive --json   # the same, one turn per stdin line
    itera-run BUNDLE --state chat.state -p "To be"   # continue from (and save) the carried state

Text streams to stdout; a stats line goes to stderr (or everything into one JSON object
with --json). Errors a user can cause end in one "error: ..." line and exit code 1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import click

from .errors import OneLineErrors, UsageError
from .generate import Generation, GenerationStats, Generator
from .graphcheck import GRAPH_SET_ENV
from .session import State
from .sampling import SamplingConfig
from .statefile import StateFileError
from .requires import installed_version as ort_version
from .options import check_threads
from .usertext import decode_user_text

EXIT_PROMPTS = ("exit", "quit")
RESET_PROMPT = "/reset"


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_once(generator: Generator, prompt: str, max_new_tokens: int, sampling: SamplingConfig,
             stop: tuple[str, ...], stream: bool, as_json: bool, state: State | None = None,
             keep_state: bool = False) -> Generation:
    """Generate one continuation, printing it (and its stats) as the options ask.

    state: continue after the text it has seen (`prompt` is then only the new text).
    """
    gen = generator.generate(prompt, max_new_tokens=max_new_tokens, sampling=sampling, stop=stop,
                             stream=stream and not as_json, state=state, keep_state=keep_state)
    try:
        for piece in gen:
            if not as_json:
                _out(piece)
    except KeyboardInterrupt:  # Ctrl-C: the partial result, as it would have ended (--json: one object), then 130
        partial = gen.interrupted()
        if partial is not None:
            _print_result(generator, gen, partial, prompt, stop, as_json)
        raise
    _print_result(generator, gen, gen.finish(), prompt, stop, as_json)
    return gen


def _print_result(generator: Generator, gen: Generation, stats: GenerationStats, prompt: str,
                  stop: tuple[str, ...], as_json: bool) -> None:
    """The end of a generation on stdout: --json's one object, else a newline (and the stats on stderr)."""
    record = {
        "text": stats.text,
        "prompt": prompt,
        "continued_after_tokens": gen.start_position,  # tokens of carried state before the prompt
        "stats": stats.as_dict(),
        "bundle": str(generator.bundle.path),
        "family": generator.family,
        "graph_set": generator.session.graph_set,  # which graphs of a dual bundle ran
        "onnxruntime": ort_version(),
        "device": generator.device,
        "threads": generator.threads,
        "sampling": {**dataclasses.asdict(gen.sampling), "stop": list(stop)},
        "retrieval": None,
    }
    r = generator.retriever
    if r is not None:
        record["retrieval"] = {"k": r.settings.k, "lambda": r.settings.lam, "temperature": r.settings.temperature,
                               "n_entries": len(r.store), "us_per_position": r.us_per_position}
    if as_json:
        _out(json.dumps(record, ensure_ascii=False) + "\n")
    else:
        _out("\n")
        click.echo(stats.summary(), err=True)


def interactive(generator: Generator, max_new_tokens: int, sampling: SamplingConfig,
                stop: tuple[str, ...], stream: bool, as_json: bool, state: State | None = None,
                state_file: str | None = None) -> None:
    """Read a line, print its continuation, repeat; Ctrl-D, "exit" or "quit" ends.

    The text carries over: each line continues after the previous continuation (on a new
    line), from the model's carried state, so a turn computes only its own line; "/reset"
    starts afresh. With `state_file` the state is written there after every turn. With a
    fixed seed every turn restarts the same random stream.
    """
    click.echo(f"{generator.family} bundle {generator.bundle.path}: type a prompt; the text carries over "
               f"({RESET_PROMPT} starts afresh); Ctrl-D or 'exit' quits.", err=True)
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            if not as_json:
                _out("\n")
            return
        if line.strip() in EXIT_PROMPTS:
            return
        if line.strip() == RESET_PROMPT:
            state = None
            continue
        if not line:
            continue
        gen = run_once(generator, line if state is None else "\n" + line, max_new_tokens, sampling, stop, stream,
                       as_json, state=state, keep_state=True)
        state = gen.state
        if state_file is not None:
            _write_state(generator, state, state_file)


def _read_state(generator: Generator, path: str | None) -> State | None:
    """The state in `path` when it exists (a state file of this bundle, else one error line)."""
    import os

    if path is None or not os.path.exists(path):
        return None
    return generator.load_state(path)


def _write_state(generator: Generator, state: State, path: str) -> None:
    """Save `state` to the user's --state file; a place that cannot be written is the user's to fix."""
    try:
        generator.save_state(state, path)
    except OSError as e:
        raise StateFileError(f"{path}: cannot write ({e.strerror or e})") from None


def _has_datastore(path: str) -> bool:
    from .bundle import load_bundle

    return load_bundle(path, verify=False).manifest.retrieval is not None


def _env_graph_set(path: str) -> str | None:
    """$ITERA_GRAPH_SET where the bundle has that set: the variable is set for mixed runs of bundles."""
    from .bundle import load_bundle

    name = os.environ.get(GRAPH_SET_ENV)
    return name if name and name in load_bundle(path, verify=False).manifest.graph_sets() else None


@click.command(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(path_type=str))
@click.option("--prompt", "-p", default=None,
              help="Prompt text. Default: stdin when it is not a terminal (one trailing newline "
                   "dropped), else an interactive loop. An empty prompt starts from a newline token.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, ... (what onnxruntime has).")
@click.option("--max-new-tokens", "-n", default=128, show_default=True, type=int)
@click.option("--temperature", default=1.0, show_default=True, type=float, help="0 is greedy.")
@click.option("--top-k", default=0, show_default=True, type=int, help="0 is off.")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="1 is off.")
@click.option("--repetition-penalty", default=1.0, show_default=True, type=float, help="1 is off.")
@click.option("--seed", default=None, type=int, help="Sampling seed; unset draws one and reports it (--json).")
@click.option("--stop", multiple=True, help="Stop when the text contains this (not printed); repeatable.")
@click.option("--threads", default=None, type=int, help="onnxruntime intra-op threads (default: its own choice).")
@click.option("--graph-set", default=None,
              help="Run this graph set of the bundle (fused, portable). Default: $ITERA_GRAPH_SET where the "
                   "bundle has that set, else fused when this onnxruntime has its kernels, else portable.")
@click.option("--retrieval/--no-retrieval", default=None,
              help="Mix in the bundle's kNN datastore (default: on when the bundle carries one).")
@click.option("--retrieval-k", default=None, type=int, help="Neighbours (default: the datastore's).")
@click.option("--retrieval-lambda", default=None, type=float,
              help="Weight of the kNN distribution, in [0, 1) (default: the datastore's, tuned on val).")
@click.option("--retrieval-temperature", default=None, type=float, help="Default: the datastore's.")
@click.option("--no-stream", is_flag=True, help="Print the text at the end instead of as it comes.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text, prompt, stats, sampling.")
@click.option("--interactive", "-i", "interactive_", is_flag=True,
              help="One turn per line of stdin, the text carrying over, even when stdin is not a terminal "
                   "(the default when it is one).")
@click.option("--state", "state_file", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="Continue from the carried state in this file when it exists (the prompt is then only the new "
                   "text), and write the state after the text back to it.")
def main(bundle, prompt, device, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
         stop, threads, graph_set, retrieval, retrieval_k, retrieval_lambda, retrieval_temperature, no_stream, as_json,
         state_file, interactive_):
    """Generate text from the itera bundle folder BUNDLE."""
    check_threads(threads)
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, seed=seed)
    if interactive_ and prompt is not None:
        raise UsageError("--interactive reads its prompts from stdin; leave out --prompt")
    if prompt is None and not interactive_ and not sys.stdin.isatty():
        prompt = decode_user_text(sys.stdin.buffer.read(), "stdin")
        prompt = prompt[:-1] if prompt.endswith("\n") else prompt
    elif prompt is not None:
        # An argv that is not UTF-8 arrives with surrogate escapes: same rule as stdin.
        prompt = decode_user_text(prompt.encode("utf-8", "surrogateescape"), "--prompt")
    mix = dict(k=retrieval_k, lam=retrieval_lambda, temperature=retrieval_temperature)
    if retrieval is None:  # default: use a datastore where there is one; asking for settings asks for one
        retrieval = any(v is not None for v in mix.values()) or _has_datastore(bundle)
    generator = Generator(bundle, device=device, threads=threads, graph_set=graph_set or _env_graph_set(bundle),
                          retrieval=mix if retrieval else None)
    for note in generator.retriever.notes if generator.retriever is not None else ():
        click.echo(f"note: {note}", err=True)
    state = _read_state(generator, state_file)
    if prompt is None:
        interactive(generator, max_new_tokens, sampling, tuple(stop), not no_stream, as_json, state, state_file)
    else:
        gen = run_once(generator, prompt, max_new_tokens, sampling, tuple(stop), not no_stream, as_json,
                       state=state, keep_state=state_file is not None)
        if state_file is not None:
            _write_state(generator, gen.state, state_file)


if __name__ == "__main__":
    main()
