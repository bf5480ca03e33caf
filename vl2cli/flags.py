"""The option table (`vl2cli/options.py`) as Typer parameters, and --help's labels.

A command is written with its own parameters and `**words`; `with_options` gives Typer the command's own
positional-or-keyword parameters, then the table's options for that command (in the table's order, with their
flags, help, hidden state and the per-task defaults of `vl2cli/resolve.py`), then its own keyword-only ones. The
table's options reach the command in `words`, by the table's names.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer

from vl2cli.options import OPTION, TASK_COMMANDS, Option, options_of
from vl2cli.resolve import task_default
from vl2cli.tasks import get_task


def option_parameter(option: Option, command: str) -> inspect.Parameter:
    """`option` as `command` takes it: a keyword parameter annotated with its typer.Option."""
    default = option.default_in(command)
    help_text = option.help_in(command)
    if command in (*TASK_COMMANDS, "ask") and option.name in ("fmt", "max_new_tokens"):
        task = get_task(command)
        default = task_default(option.name, task, asking=command == "ask")
        help_text = (help_text or "").format(formats=", ".join(task.formats))
    info = typer.Option(*option.flags, help=help_text, hidden=option.hidden_in(command),
                        show_default=option.show_default)
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[option.type, info])


def with_options(command: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate `fn(own..., **words)` so that Typer sees the table's options for `command` too."""
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.kind != p.VAR_KEYWORD]
        before = [p.replace(kind=p.KEYWORD_ONLY) for p in own if p.kind != p.KEYWORD_ONLY]
        after = [p for p in own if p.kind == p.KEYWORD_ONLY]
        params = [*before, *(option_parameter(o, command) for o in options_of(command)), *after]

        @functools.wraps(fn)
        def command_function(**given: Any) -> Any:
            return fn(**given)
        del command_function.__wrapped__  # Typer reads __signature__, not the function wrapped
        command_function.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command_function.__annotations__ = {p.name: p.annotation for p in params}
        return command_function
    return decorate


def flag(name: str) -> str:
    """The first command-line spelling of a table option, for messages."""
    return OPTION[name].flags[0].split("/")[0]


def plain_help_types(command: Any) -> None:
    """typer labels every option in --help with its Python type; `<bool>` on a flag (which takes no value) and
    `<list[str]>` on the inputs read as if a value were expected. Flags and the inputs show no label."""
    for sub in getattr(command, "commands", {}).values():
        plain_help_types(sub)
    for param in getattr(command, "params", []):
        if param.param_type_name == "option" and param.metavar is None and getattr(param, "is_flag", False):
            param.metavar = ""
        elif param.param_type_name == "option" and param.metavar is None and hasattr(param, "bare_type") \
                and param.bare_type().startswith("list["):
            param.metavar = f"<{param.bare_type()[5:-1]}>"  # a repeatable option takes one value each time
        elif param.param_type_name == "argument" and param.nargs == -1:
            param.display_type_rich = lambda ctx: ""  # noqa: ARG005 (typer passes ctx=); typer's argument label ignores metavar
    if hasattr(command, "get_help_option"):
        make_help_option = command.get_help_option

        def help_option(ctx: Any) -> Any:  # -h is a flag too, made when help is asked for
            option = make_help_option(ctx)
            if option is not None and option.metavar is None:
                option.metavar = ""
            return option
        command.get_help_option = help_option
