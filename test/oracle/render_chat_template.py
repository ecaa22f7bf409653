"""The reference rendering of a chat template, as Hugging Face transformers renders it
(apply_chat_template): Jinja2's sandbox with trim_blocks and lstrip_blocks, loop
controls, the {% generation %} tag, raise_exception, strftime_now and transformers'
own tojson. Reads JSON lines {"template", "context", "now"} on stdin; writes one JSON
line per input: {"text": ...}, {"raised": ...} when the template refused the
conversation on purpose, or {"error": ...} when jinja2 itself could not render it."""
import json
import sys
from datetime import datetime

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class AssistantTracker(Extension):
    # transformers' {% generation %} … {% endgeneration %}: renders its body as is.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class Raised(jinja2.exceptions.TemplateError):
    """The template refused the conversation on purpose (raise_exception)."""


def raise_exception(message):
    raise Raised(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def main():
    for line in sys.stdin:
        req = json.loads(line)
        now = datetime.fromisoformat(req.get("now", "2026-11-29T12:00:00"))
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[AssistantTracker, loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: now.strftime(fmt)
        try:
            text = env.from_string(req["template"]).render(**req["context"])
            out = {"text": text}
        except Raised as e:
            out = {"raised": str(e)}
        except Exception as e:  # noqa: BLE001 - every failure is reported to the caller
            out = {"error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


main()
