"""What the model is asked about an image, and the row its answers make.

caption, describe: one prompt an image (the row's own, else the task's), and the row is what the
model said: the caption as Kosmos-2's processor cleans it, its entities and their boxes.
ground: one prompt per phrase, `<grounding><phrase> dog</phrase>`, all reading the image's one
encoding; the row has one entity per requested phrase, named exactly as requested.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from pipeline import records
from pipeline.annotation.decode import Decoded
from pipeline.config import AppConfig, TaskKind
from pipeline.engine import Generation, Request
from pipeline.model import prompt as prompts
from pipeline.model.grounding import add_scores, parse
from pipeline.model.runtime import KosmosModel
from pipeline.records import Entity, Item

# The prompt of rows that bring none; a ground row's error row says it too (as folders have recorded).
TASK_PROMPTS = {
    TaskKind.caption: prompts.CAPTION,
    TaskKind.describe: prompts.DESCRIBE,
    TaskKind.ground: prompts.CAPTION,
}


def task_prompt(cfg: AppConfig) -> str:
    return cfg.prompt or TASK_PROMPTS[cfg.task.kind]


def read(model: KosmosModel, gen: Generation) -> tuple[str, list[Entity]]:
    """Caption and entities of a generation, each entity and box scored from its tokens."""
    ids = model.ids_after_image(gen.prompt_ids, gen.token_ids)
    caption, entities = parse(model.decode(ids))
    add_scores(entities, ids, [None] * (len(ids) - len(gen.token_ids)) + gen.token_logprobs, model.tags)
    return caption, entities


class Caption:
    """caption and describe."""

    no_prompts = ""  # never: every item has a prompt

    def __init__(self, model: KosmosModel, prompt: str):
        self.model, self.prompt = model, prompt

    def prompts(self, item: Item) -> list[str]:
        return [item.prompt or self.prompt]

    def error_row(self, item: Item) -> dict:
        return records.row(item, prompt=item.prompt or self.prompt, error=item.error)

    def row(self, item: Item, gens: list[Generation]) -> dict:
        (gen,) = gens
        caption, entities = read(self.model, gen)
        return records.row(
            item,
            prompt=item.prompt or self.prompt,
            caption=caption,
            entities=[e.as_row() for e in entities],
            **records.tokens(gen.token_ids, gen.token_logprobs),
        )


class Ground:
    """ground: the row's phrases (input.phrases_column), else task.phrases."""

    no_prompts = "no phrases: this row's phrases are empty and task.phrases is empty"

    def __init__(self, model: KosmosModel, phrases: list[str], prompt: str):
        self.model, self.phrases, self.prompt = model, phrases, prompt

    def phrases_of(self, item: Item) -> list[str]:
        return [p for p in (item.phrases if item.phrases else self.phrases) if p and p.strip()]

    def prompts(self, item: Item) -> list[str]:
        return [prompts.ground(phrase) for phrase in self.phrases_of(item)]

    def error_row(self, item: Item) -> dict:
        return records.row(item, prompt=item.prompt or self.prompt, error=item.error)

    def row(self, item: Item, gens: list[Generation]) -> dict:
        """One entity per requested phrase, with the boxes the model gave it; the caption is the
        phrases joined with "; ", so that every entity's span points at its phrase."""
        caption, entities, tokens, logprobs = "", [], [], []
        for phrase, gen in zip(self.phrases_of(item), gens):
            _, found = read(self.model, gen)
            wanted = " ".join(phrase.split()).lower()
            match = next((e for e in found if " ".join(e.phrase.split()).lower() == wanted), Entity(phrase, 0, 0))
            start = len(caption) + (2 if caption else 0)
            caption = f"{caption}; {phrase}" if caption else phrase
            entities.append(
                Entity(phrase, start, start + len(phrase), match.boxes, match.box_scores, match.score).as_row()
            )
            tokens += gen.token_ids
            logprobs += gen.token_logprobs
        return records.row(
            item, prompt=prompts.GROUND, caption=caption, entities=entities, **records.tokens(tokens, logprobs)
        )


Task = Caption | Ground


def make_task(cfg: AppConfig, model: KosmosModel) -> Task:
    if cfg.task.kind == TaskKind.ground:
        return Ground(model, list(cfg.task.phrases), task_prompt(cfg))
    return Caption(model, task_prompt(cfg))


def requests(task: Task, model: KosmosModel, max_new_tokens: int, decoded: Iterable[Decoded]) -> Iterator[Request]:
    """An image's requests, all sharing its one pixel array, tagged (decoded, how many). A row whose
    prompt leaves no room for `max_new_tokens` in the model's positions is an error row: past the
    table its positions would silently be wrong. An item that failed passes through as one request
    without pixels."""
    for d in decoded:
        wanted = task.prompts(d.item) if not d.error else []
        if not d.error and not wanted:
            d.item.error = task.no_prompts
        longest = max((len(model.encode_prompt(p).input_ids) for p in wanted), default=0) if not d.error else 0
        if longest + max_new_tokens > model.max_positions:
            d.item.error = (
                f"prompt too long: {longest} tokens and engine.max_new_tokens={max_new_tokens} "
                f"exceed the model's {model.max_positions} positions; shorten this row's prompt"
            )
        if d.error:
            yield Request(None, "", tag=(d, 1))
        else:
            for prompt in wanted:
                yield Request(d.pixel_values, prompt, tag=(d, len(wanted)))
