"""Task specs: a prompt template and ordered label words, tied to a tokenizer."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ifedicl.kernel.errors import TaskSpecError

# I2CL's templates and label words (METHOD.md), for HF datasets loaded by name.
KNOWN_TASKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sst2": ("Review: {text}\nSentiment:", ("negative", "positive")),
    "mr": ("Review: {text}\nSentiment:", ("negative", "positive")),
    "sst5": ("Sentence: {text}\nSentiment:", ("terrible", "negative", "neutral", "positive", "great")),
    "subj": ("Sentence: {text}\nLabel:", ("objective", "subjective")),
    "agnews": ("News: {text}\nType:", ("World", "Sports", "Business", "Technology")),
    "ag_news": ("News: {text}\nType:", ("World", "Sports", "Business", "Technology")),
    "trec": (
        "Question: {text}\nAnswer Type:",
        ("Abbreviation", "Entity", "Description", "Person", "Location", "Number"),
    ),
    "dbpedia": (
        "Input: {text}\nLabel:",
        (
            "company",
            "school",
            "artist",
            "athlete",
            "politics",
            "transportation",
            "building",
            "nature",
            "village",
            "animal",
            "plant",
            "album",
            "film",
            "book",
        ),
    ),
    "emo": ("Dialogue: {text}\nEmotion:", ("others", "happy", "sad", "angry")),
}


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: name, prompt template with a ``{text}`` slot, label words in class order."""

    name: str
    template: str
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ '\""):
            raise TaskSpecError(f"task name {self.name!r} must be non-empty, without spaces, quotes or slashes")
        if "{text}" not in self.template:
            raise TaskSpecError(f"task {self.name}: template {self.template!r} has no {{text}} slot")
        if len(self.labels) < 2:
            raise TaskSpecError(f"task {self.name}: needs at least 2 label words, got {list(self.labels)}")
        if len(set(self.labels)) != len(self.labels):
            raise TaskSpecError(f"task {self.name}: duplicate label words {list(self.labels)}")

    def prompt(self, text: str) -> str:
        """Zero-shot prompt: ``template(x)``."""
        return self.template.replace("{text}", text)

    def demonstration(self, text: str, label: int) -> str:
        """Stage-1 demonstration: ``template(x) + " " + label_word + "\\n"``."""
        return f"{self.prompt(text)} {self.labels[label]}\n"

    def to_dict(self) -> dict:
        return {**asdict(self), "labels": list(self.labels)}

    @classmethod
    def from_dict(cls, data: dict) -> TaskSpec:
        try:
            return cls(name=str(data["name"]), template=str(data["template"]), labels=tuple(data["labels"]))
        except KeyError as missing:
            raise TaskSpecError(f"task spec lacks field {missing}") from None


def label_token_ids(task: TaskSpec, tokenizer) -> list[int]:
    """First token id of each label word as it follows the prompt.

    The label is scored as the continuation of the prompt (``prompt + " " + word``),
    so we tokenize exactly that and take the first token after the prompt: this
    handles GPT-2 style leading-space tokens and SentencePiece alike.
    """
    prompt = task.prompt("x")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = []
    for word in task.labels:
        full = tokenizer(f"{prompt} {word}", add_special_tokens=False)["input_ids"]
        if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
            ids.append(full[len(prompt_ids)])
        else:  # the boundary merged; fall back to the word with its leading space
            ids.append(tokenizer(f" {word}", add_special_tokens=False)["input_ids"][0])
    unknown = getattr(tokenizer, "unk_token_id", None)
    for word, token in zip(task.labels, ids):
        if unknown is not None and token == unknown:
            raise TaskSpecError(
                f"task {task.name}: label word {word!r} is unknown to this model's tokenizer (it encodes as "
                f"{tokenizer.unk_token!r}); pick label words the model's vocabulary has, or another model"
            )
    seen: dict[int, str] = {}
    for word, token in zip(task.labels, ids):
        if token in seen:
            raise TaskSpecError(
                f"task {task.name}: labels {seen[token]!r} and {word!r} share their first token "
                f"{tokenizer.convert_ids_to_tokens(token)!r} (id {token}); pick label words that start differently"
            )
        seen[token] = word
    return ids
