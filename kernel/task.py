"""Task specs: a prompt template and ordered label words, tied to a tokenizer."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ifedicl.kernel.errors import TaskSpecError

# I2CL's templates and label words (docs/method.md), for HF datasets loaded by name.
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
        # Checked here, not only when loading task.json: the CLI's --template/--labels, the store's
        # recorded specs and the built-in tasks all go through this constructor.
        if not isinstance(self.name, str) or not self.name or any(c in self.name for c in "/\\ '\""):
            raise TaskSpecError(f"task name {self.name!r} must be non-empty, without spaces, quotes or slashes")
        if not isinstance(self.template, str) or "{text}" not in self.template:
            raise TaskSpecError(f"task {self.name}: template {self.template!r} has no {{text}} slot")
        for word in self.labels:
            # a label word is text the model must produce after the prompt: a number or a boolean in
            # task.json is almost always a mistake (labels are the *words*, the data holds their indices)
            if not isinstance(word, str) or not word.strip():
                raise TaskSpecError(
                    f"task {self.name}: label word {word!r} must be a non-empty string (labels: {list(self.labels)})"
                )
        if len(self.labels) < 2:
            raise TaskSpecError(f"task {self.name}: needs at least 2 label words, got {list(self.labels)}")
        duplicates = sorted({w for w in self.labels if self.labels.count(w) > 1})
        if duplicates:
            raise TaskSpecError(
                f"task {self.name}: duplicate label word{'s' if len(duplicates) > 1 else ''} "
                f"{', '.join(map(repr, duplicates))} in {list(self.labels)}; each class needs its own word"
            )

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
        """Build from a ``task.json``-shaped dict; wrong types are refused, not coerced.

        ``str()``/``tuple()`` coercion used to turn ``"labels": "neg,pos"`` into seven one-letter labels
        and ``"template": 5`` into ``"5"``; both are errors that name the offending value instead.
        """
        if not isinstance(data, dict):
            raise TaskSpecError(f"task spec must be a JSON object with name, template and labels, got {data!r}")
        missing = [key for key in ("name", "template", "labels") if key not in data]
        if missing:
            raise TaskSpecError(f"task spec lacks field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        for key in ("name", "template"):
            if not isinstance(data[key], str):
                raise TaskSpecError(f"task spec field {key!r} must be a string, got {data[key]!r}")
        if not isinstance(data["labels"], list | tuple):
            raise TaskSpecError(f"task spec field 'labels' must be a list of label words, got {data['labels']!r}")
        return cls(name=data["name"], template=data["template"], labels=tuple(data["labels"]))


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
