"""The simulated node's command language: a small POSIX-like lexer and parser.

No real shell ever runs on a simulated node.  A command string is split into words and
operators here (``;``, ``&&``, ``||``, ``&``, redirections, ``'...'``/``"..."`` quoting) and
parsed into and-or lists that :mod:`rhaas.sim.shell` runs.  Expansions (``$``, backquotes,
globs) and pipes are refused with exit 127: the farm never expands anything.

Written by hand rather than with :mod:`shlex`: shlex neither reports operators and
redirections as such nor refuses expansions, and both matter to what a node may run.
"""

from __future__ import annotations


class ShellError(Exception):
    def __init__(self, msg: str, status: int = 2):
        super().__init__(msg)
        self.status = status


OPERATORS = (";", "&&", "||", "&", "|", "(", ")")
_UNSUPPORTED_UNQUOTED = set("*?[]{}~`$")


def tokenize(text: str) -> list[tuple[str, str]]:
    """POSIX-ish tokens: ("word", text) or ("op", symbol); redirections are ("redir", "N>" ...).

    Quoting follows sh: '...' is literal, "..." allows backslash escapes of $`"\\ and
    newline, a bare backslash escapes the next character. Operators are only recognised
    outside quotes. Expansions and globs are refused (this farm never expands anything).
    """
    tokens: list[tuple[str, str]] = []
    i, n = 0, len(text)
    word: list[str] = []
    in_word = False
    quoted = False

    def flush():
        nonlocal word, in_word, quoted
        if in_word:
            tokens.append(("word", "".join(word)))
        word, in_word, quoted = [], False, False

    while i < n:
        c = text[i]
        if c in " \t":
            flush()
            i += 1
        elif c == "\n":
            flush()
            tokens.append(("op", ";"))
            i += 1
        elif c == "#" and not in_word:
            while i < n and text[i] != "\n":
                i += 1
        elif c == "'":
            j = text.find("'", i + 1)
            if j < 0:
                raise ShellError("sh: unterminated quoted string")
            word.append(text[i + 1 : j])
            in_word = quoted = True
            i = j + 1
        elif c == '"':
            i += 1
            in_word = quoted = True
            while True:
                if i >= n:
                    raise ShellError("sh: unterminated quoted string")
                c = text[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\" and i + 1 < n and text[i + 1] in '$`"\\\n':
                    if text[i + 1] != "\n":
                        word.append(text[i + 1])
                    i += 2
                    continue
                if c in "$`":
                    raise ShellError("sh: expansion is not supported by the simulated node", 127)
                word.append(c)
                i += 1
        elif c == "\\":
            if i + 1 < n and text[i + 1] != "\n":
                word.append(text[i + 1])
                in_word = quoted = True
            i += 2
        elif c in "<>":
            fd = None
            if in_word and not quoted and "".join(word).isdigit():
                fd = "".join(word)
                word, in_word = [], False
            flush()
            op = c
            if i + 1 < n and text[i + 1] in (">", "&") and not (c == "<" and text[i + 1] == ">"):
                op += text[i + 1]
                i += 1
            i += 1
            tokens.append(("redir", (fd or ("0" if c == "<" else "1")) + op))
        elif c in ";&|()":
            flush()
            two = text[i : i + 2]
            if two in ("&&", "||"):
                tokens.append(("op", two))
                i += 2
            else:
                tokens.append(("op", c))
                i += 1
        else:
            if c in _UNSUPPORTED_UNQUOTED:
                raise ShellError(f"sh: {c!r} (expansion or glob) is not supported by the simulated node", 127)
            word.append(c)
            in_word = True
            i += 1
    flush()
    return tokens


# -- parser ---------------------------------------------------------------------------------
class Simple:
    def __init__(self):
        self.argv: list[str] = []
        self.redirs: list[tuple[int, str, str]] = []  # (fd, op, target) op in < > >> >&


def parse(text: str) -> list[tuple[list[tuple[str | None, Simple]], bool]]:
    """A list of (and-or list, background?); an and-or list is [(connector, command)]."""
    tokens = tokenize(text)
    jobs: list[tuple[list, bool]] = []
    current: list = []
    cmd: Simple | None = None
    connector: str | None = None
    i = 0

    def end_command():
        nonlocal cmd
        if cmd is None or not cmd.argv:
            raise ShellError("sh: syntax error: missing command")
        current.append((connector, cmd))
        cmd = None

    while i < len(tokens):
        kind, val = tokens[i]
        if kind == "word":
            cmd = cmd or Simple()
            cmd.argv.append(val)
        elif kind == "redir":
            cmd = cmd or Simple()
            if i + 1 >= len(tokens) or tokens[i + 1][0] != "word":
                raise ShellError("sh: syntax error: redirection without a target")
            fd, op = int(val[: -len(val.lstrip("0123456789"))] or 0), val.lstrip("0123456789")
            cmd.redirs.append((fd, op, tokens[i + 1][1]))
            i += 1
        elif val in ("&&", "||"):
            end_command()
            connector = val
        elif val in (";", "&"):
            if cmd is None and not current and val == ";":
                i += 1
                continue
            end_command()
            jobs.append((current, val == "&"))
            current, connector = [], None
        elif val == "|":
            raise ShellError("sh: pipes are not supported by the simulated node", 127)
        else:
            raise ShellError(f"sh: syntax error near {val!r}")
        i += 1
    if cmd is not None:
        end_command()
    elif connector is not None:
        raise ShellError("sh: syntax error: unexpected end of command")
    if current:
        jobs.append((current, False))
    return jobs

