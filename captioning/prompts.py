"""Versioned multi-level chain-of-thought (MCoT) prompts, one template per image domain.

The model describes an image from coarse to fine (global, attributes, details) before writing a
one-sentence ``Final_Caption``: writing the levels out first is what makes the final sentence
name the attributes that tell a target apart from its look-alikes. A ``plain`` style asks for the
sentence alone, the single-level baseline of the ablation study.

Every caption stores :attr:`PromptSpec.version`, which names the template, its revision, the
levels asked for and the word limit, so captions made with different prompts are never mixed.
Change a template's text only together with its ``revision`` (a test pins the texts).
"""

from __future__ import annotations

from dataclasses import dataclass

from csmcir.errors import ConfigError

LEVELS: tuple[str, ...] = ("global", "attributes", "details")
FINAL_KEY = "Final_Caption"
STYLES: tuple[str, ...] = ("mcot", "plain")

# 25 words is about 30 WordPiece tokens: the Q-Former's 32-token text length minus [CLS] and [SEP].
DEFAULT_MAX_WORDS = 25

SYSTEM = (
    "You are an expert image annotator for composed image retrieval. "
    "You always answer in English with a single JSON object and nothing else."
)


@dataclass(frozen=True)
class DomainTemplate:
    """What to look at in one image domain: one instruction per level and an example caption."""

    subject: str
    revision: int
    levels: dict[str, str]
    example: str


DOMAINS: dict[str, DomainTemplate] = {
    "fashion": DomainTemplate(
        subject="fashion product image",
        revision=1,
        levels={
            "global": "the garment or product category (dress, shirt, top, shoe...) and its "
            "overall style",
            "attributes": "its salient attributes: colours, material, pattern or print, shape "
            "and fit, sleeves, neckline, length, heel or sole",
            "details": "the discriminative details that tell it apart from similar items: "
            "logos, text, trims, buttons, cut-outs, prints",
        },
        example="a red sleeveless knee-length dress with a white floral print and a v-neck",
    ),
    "scene": DomainTemplate(
        subject="photograph",
        revision=1,
        levels={
            "global": "the kind of scene and its main subjects",
            "attributes": "salient attributes: how many of each subject, their colours, "
            "materials, poses and actions, and the spatial layout",
            "details": "the discriminative details that tell this photo apart from similar "
            "ones: background, viewpoint, small objects, text",
        },
        example="two brown dogs running on a sandy beach towards the camera",
    ),
    "synthetic": DomainTemplate(
        subject="synthetic image of coloured shapes on a grid",
        revision=1,
        levels={
            "global": "how many objects there are and which shapes",
            "attributes": "each object's size, colour and shape",
            "details": "where each object is on the grid (row and column)",
        },
        example="small red circle top left, large blue square center, small green cross "
        "bottom right",
    ),
}

# Benchmark registry name -> prompt domain.
BENCHMARK_DOMAINS: dict[str, str] = {
    "fashioniq": "fashion",
    "shoes": "fashion",
    "fashion200k": "fashion",
    "cirr": "scene",
    "circo": "scene",
    "synthcir": "synthetic",
}


def domain_for(benchmark: str) -> str:
    """The prompt domain of a benchmark; unknown benchmarks need an explicit ``--domain``."""
    try:
        return BENCHMARK_DOMAINS[benchmark]
    except KeyError:
        raise ConfigError(
            f"no prompt domain known for benchmark {benchmark!r}: pass --domain "
            f"({', '.join(DOMAINS)})"
        ) from None


@dataclass(frozen=True)
class Prompt:
    """The rendered text a backend sends along with the image."""

    system: str
    user: str


@dataclass(frozen=True)
class PromptSpec:
    """Which prompt to ask and how to check its answer."""

    domain: str
    style: str = "mcot"
    levels: tuple[str, ...] = LEVELS
    max_words: int = DEFAULT_MAX_WORDS

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ConfigError(f"--domain must be one of {', '.join(DOMAINS)} (got {self.domain!r})")
        if self.style not in STYLES:
            raise ConfigError(f"--style must be one of {', '.join(STYLES)} (got {self.style!r})")
        unknown = [lv for lv in self.levels if lv not in LEVELS]
        if unknown:
            raise ConfigError(f"--levels: unknown level(s) {unknown}; choose from {list(LEVELS)}")
        if len(set(self.levels)) != len(self.levels):
            raise ConfigError(f"--levels lists a level twice: {list(self.levels)}")
        if self.style == "mcot" and not self.levels:
            raise ConfigError("--levels is empty: the mcot style needs at least one level")
        if self.style == "plain":
            object.__setattr__(self, "levels", ())
        if self.max_words < 3:
            raise ConfigError(f"--max-words must be at least 3 (got {self.max_words})")

    @property
    def template(self) -> DomainTemplate:
        return DOMAINS[self.domain]

    @property
    def version(self) -> str:
        """Identifies the exact prompt text, e.g. ``synthetic/mcot-r1/global+attributes/w25``."""
        levels = "+".join(self.levels) if self.levels else "none"
        return f"{self.domain}/{self.style}-r{self.template.revision}/{levels}/w{self.max_words}"

    def render(self) -> Prompt:
        t = self.template
        sentence = (
            f"one English sentence of at most {self.max_words} words, written like a short "
            f'description (for example: "{t.example}")'
        )
        if self.style == "plain":
            user = (
                f"Describe this {t.subject} in {sentence}. Answer with a JSON object with the "
                f'single key "{FINAL_KEY}".'
            )
            return Prompt(SYSTEM, user)
        steps = "\n".join(
            f'{i}. "{level}": {t.levels[level]}.' for i, level in enumerate(self.levels, 1)
        )
        keys = ", ".join(f'"{k}"' for k in (*self.levels, FINAL_KEY))
        user = (
            f"Describe this {t.subject} step by step, from coarse to fine.\n{steps}\n"
            f'Then write "{FINAL_KEY}": {sentence}. It must name what the levels above found '
            f"most distinctive.\nAnswer with a JSON object with exactly these keys, in this "
            f"order: {keys}. Every value is a plain string."
        )
        return Prompt(SYSTEM, user)
