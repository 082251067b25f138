"""Judge prompts for the LLM judges (`openai:`, `hf:`).

A template is a system message (may be empty) and a user message with the placeholders {prompt}, {answer_a},
{answer_b} and, for personalized judging, {user_text}. Every template asks for MT-Bench's verdict format: "[[A]]",
"[[B]]" or "[[C]]" (tie); `evaluation.verdicts.parse_verdict` reads it and the hf judge reads the letter after "[[".

- `mtbench`: the neutral pairwise judge of MT-Bench (Zheng et al. 2023, "Judging LLM-as-a-judge", FastChat's
  pairwise prompt; Apache-2.0), the user's identity plays no part.
- `psoups`: states the user's preference criterion (`user_text`, e.g. P-SOUPS' "Generate a response that can be
  easily understood by an elementary school student") and asks which answer satisfies it better.
- `prism`: the judge role-plays the user from their profile (`user_text`: PRISM's sociodemographics and stated
  preferences) and says which answer that person would prefer.
- a FILE: a UTF-8 text file, used whole as the user message (no system message). It must contain {prompt},
  {answer_a} and {answer_b}, may contain {user_text}, and must ask for the [[A]] / [[B]] / [[C]] format; write a
  literal brace as {{ or }}.
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from pathlib import Path

REQUIRED = ("prompt", "answer_a", "answer_b")
OPTIONAL = ("user_text",)
VERDICT_TAGS = ("[[A]]", "[[B]]", "[[C]]")

_VERDICT_FORMAT = ('output your final verdict by strictly following this format: "[[A]]" if assistant A is better, '
                   '"[[B]]" if assistant B is better, and "[[C]]" for a tie.')

_ANSWERS = ("[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
            "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]")


class TemplateError(ValueError):
    """A template that cannot be used (unknown name, missing file, bad placeholders); the message names it."""


@dataclass(frozen=True)
class Template:
    name: str  # a built-in name or the file's path
    system: str
    user: str

    @property
    def needs_user_text(self) -> bool:
        return "user_text" in placeholders(self.user) | placeholders(self.system)

    @property
    def digest(self) -> str:
        """What the verdict cache keys on: the template's text, not its name (an edited file is a new template)."""
        return hashlib.sha256(f"{self.system}\x00{self.user}".encode()).hexdigest()

    def render(self, prompt: str, answer_a: str, answer_b: str, user_text: str | None = None) -> tuple[str, str]:
        """(system, user) messages. The answers are inserted verbatim: braces in them are text, not placeholders."""
        if self.needs_user_text and not user_text:
            raise TemplateError(f"template {self.name!r} needs the user's user_text, and this record has none")
        values = {"prompt": prompt, "answer_a": answer_a, "answer_b": answer_b, "user_text": user_text or ""}
        return self.system.format_map(values), self.user.format_map(values)


MTBENCH = Template(
    "mtbench",
    system=("Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants "
            "to the user question displayed below. You should choose the assistant that follows the user's "
            "instructions and answers the user's question better. Your evaluation should consider factors such as the "
            "helpfulness, relevance, accuracy, depth, creativity, and level of detail of their responses. Begin your "
            "evaluation by comparing the two responses and provide a short explanation. Avoid any position biases and "
            "ensure that the order in which the responses were presented does not influence your decision. Do not "
            "allow the length of the responses to influence your evaluation. Do not favor certain names of the "
            "assistants. Be as objective as possible. After providing your explanation, " + _VERDICT_FORMAT),
    user="[User Question]\n{prompt}\n\n" + _ANSWERS,
)

PSOUPS = Template(
    "psoups",
    system=("Please act as an impartial judge of how well two AI assistants serve one particular user. The user has "
            "stated a preference for how they want to be answered. Choose the assistant whose response satisfies that "
            "preference better while still answering the user's question. Judge by the stated preference, not by "
            "your own taste: if the user asks for brevity, a longer answer is not better for being more detailed. "
            "Begin by comparing the two responses against the preference and give a short explanation. Do not let "
            "the order in which the responses were presented or the names of the assistants influence your decision. "
            "After providing your explanation, " + _VERDICT_FORMAT),
    user="[User's Preference]\n{user_text}\n\n[User Question]\n{prompt}\n\n" + _ANSWERS,
)

PRISM = Template(
    "prism",
    system=("You are role-playing a specific person, described below in their own survey answers: who they are and "
            "what they want from an AI assistant. Stay in character. You asked an AI assistant a question and got "
            "two responses. Decide which one you, as this person, would prefer, by your own values, needs and stated "
            "preferences, not by what a generic user would want. Begin with a short explanation in this person's "
            "voice. Do not let the order in which the responses were presented or the names of the assistants "
            "influence you. After your explanation, " + _VERDICT_FORMAT),
    user="[Who You Are]\n{user_text}\n\n[Your Question]\n{prompt}\n\n" + _ANSWERS,
)

BUILTIN = {t.name: t for t in (MTBENCH, PSOUPS, PRISM)}


def placeholders(text: str) -> set[str]:
    """The {names} of a format string (a literal brace is written {{ or }})."""
    return {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}


def check_placeholders(text: str, where: str) -> None:
    """TemplateError naming `where` unless `text` has every required placeholder, only known ones, plain fields
    (no {x!r} or {x:>10}), balanced braces and the verdict tags."""
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError as exc:  # "Single '}' encountered in format string" and the like
        raise TemplateError(f"{where}: not a valid template ({exc}); write a literal brace as {{{{ or }}}}") from None
    names = {f for _, f, _, _ in fields if f is not None}
    unknown = sorted(names - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        allowed = ", ".join("{" + p + "}" for p in REQUIRED + OPTIONAL)
        raise TemplateError(f"{where}: unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)} "
                            f"(allowed: {allowed}; a literal brace is {{{{ or }}}})")
    missing = [p for p in REQUIRED if p not in names]
    if missing:
        raise TemplateError(f"{where}: missing placeholder(s) {', '.join('{' + m + '}' for m in missing)} "
                            f"(a template needs {', '.join('{' + p + '}' for p in REQUIRED)})")
    fancy = [f for _, f, spec, conv in fields if f is not None and (spec or conv)]
    if fancy:
        raise TemplateError(f"{where}: placeholder {{{fancy[0]}}} has a format spec or conversion; write plain "
                            f"{{{fancy[0]}}}")
    absent = [t for t in VERDICT_TAGS[:2] if t not in text]
    if absent:
        raise TemplateError(f"{where}: the template must ask for the verdict format \"[[A]]\" / \"[[B]]\" / \"[[C]]\" "
                            f"(tie), which the judges parse; {' and '.join(absent)} not found")


def load_template(spec: str) -> Template:
    """A built-in template by name, or a template FILE (validated; TemplateError naming the file)."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    path = Path(spec)
    if not path.is_file():
        raise TemplateError(f"--template {spec!r}: neither a built-in template ({', '.join(BUILTIN)}) nor a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"--template {path}: cannot read it as UTF-8 text ({exc})") from None
    check_placeholders(text, f"--template {path}")
    return Template(str(path), system="", user=text)
