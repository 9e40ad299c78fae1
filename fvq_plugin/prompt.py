"""A recipe's prompt as token ids: where each stream's tokens go, the level words and the score prompt.

The prompt is rendered as text with InternVL's image-context token standing in for every stream
slot and tokenized in one piece, as InternVL itself does (tokenizing pieces apart would change
SentencePiece's word boundaries); the k-th context token then belongs to the k-th slot.
"""
from __future__ import annotations

import torch

from .common import LEVELS, STREAMS
from .recipe import SLOT, Recipe, RecipeError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


class Prompt:
    """Token ids of `recipe`'s prompt for `tokenizer`, ending with the answer up to the level word.

    ids        [P]  the prompt
    stream_map [P]  0 for text, 1 + the stream's index in STREAMS at its slots
    level_ids  [5]  the first token of each level word where it follows the prompt
    continuation_ids [5, C] or None: per level, the tokens of "<level>... <score_prompt>" after the prompt
    """

    def __init__(self, recipe: Recipe, tokenizer, streams, tokens_per_frame: int, context_token_id: int):
        self.recipe, self.tokenizer = recipe, tokenizer
        self.slots = self._slots(streams, tokens_per_frame)
        self.text = self._render(self._user_text(tokenizer.convert_ids_to_tokens(context_token_id)))
        ids = self._encode(self.text)
        if recipe.bos:
            if tokenizer.bos_token_id is None:
                raise RecipeError(f"recipe {recipe.name!r} starts with BOS, but the tokenizer has no BOS token")
            if ids[:1] != [tokenizer.bos_token_id]:
                ids = [tokenizer.bos_token_id] + ids
        self.ids = torch.tensor(ids)
        self.stream_map = self._stream_map(self.ids, context_token_id)
        self.level_ids, self.continuation_ids = self._answers()

    # ----- rendering ----------------------------------------------------------------------------

    def _slots(self, streams, tokens_per_frame: int) -> list[tuple[str, str, int]]:
        """(stream, text with <slot>, tokens at the slot) in prompt order."""
        recipe, frames = self.recipe, self.recipe.num_frames
        slots = []
        for stream, text, count, repeat in (("spatial", recipe.frame_text, tokens_per_frame, frames),
                                            ("portrait", recipe.portrait_text, tokens_per_frame, frames),
                                            ("face", recipe.face_text, frames, 1),
                                            ("temporal", recipe.motion_text, 1, 1)):
            if stream in streams:
                slots += [(stream, text.replace("{i}", str(i + 1)), count) for i in range(repeat)]
        return slots

    def _user_text(self, context_token: str) -> str:
        tokenizer = self.tokenizer
        start = end = ""
        if self.recipe.wrap_slots:
            start, end = getattr(tokenizer, "start_image_token", None), getattr(tokenizer, "end_image_token", None)
            if not start or not end:
                raise RecipeError(f"recipe {self.recipe.name!r} wraps every slot in image start/end tokens, but the "
                                  "tokenizer names none (start_image_token / end_image_token, e.g. <img> </img>)")
        return "".join(text.replace(SLOT, start + context_token * count + end)
                       for _, text, count in self.slots) + self.recipe.question

    def _render(self, user: str) -> str:
        recipe, tokenizer = self.recipe, self.tokenizer
        if recipe.chat_template == "internlm2-chat":
            for token in (IM_START, IM_END):
                if len(self._encode(token)) != 1:
                    raise RecipeError(f"recipe {recipe.name!r} uses InternVL's internlm2-chat template, but {token} is "
                                      "not one token of this tokenizer (not an InternLM2/InternVL tokenizer?)")
            # InternVL's Conversation.get_prompt with SeparatorStyle.MPT: no newline after <|im_end|>.
            return (f"{IM_START}system\n{recipe.system_message or ''}{IM_END}{IM_START}user\n{user}{IM_END}"
                    f"{IM_START}assistant\n{recipe.answer_prefix}")
        if not getattr(tokenizer, "chat_template", None):
            raise RecipeError(f"recipe {recipe.name!r} renders the prompt with the tokenizer's chat template, and this "
                              "tokenizer has none; use a tokenizer that has one or a recipe with chat_template "
                              "'internlm2-chat'")
        messages = [{"role": "user", "content": user}]
        if recipe.system_message is not None:
            messages.insert(0, {"role": "system", "content": recipe.system_message})
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if recipe.bos and tokenizer.bos_token and rendered.startswith(tokenizer.bos_token):
            rendered = rendered[len(tokenizer.bos_token):]  # BOS is added as an id, once
        return rendered + recipe.answer_prefix

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _stream_map(self, ids: torch.Tensor, context_token_id: int) -> torch.Tensor:
        positions = (ids == context_token_id).nonzero().flatten()
        expected = sum(count for _, _, count in self.slots)
        if len(positions) != expected:
            raise RecipeError(f"recipe {self.recipe.name!r}: the prompt holds {len(positions)} image-context tokens "
                              f"where its slots need {expected} (does the prompt text itself contain one?)")
        owners = torch.tensor([1 + STREAMS.index(stream) for stream, _, count in self.slots for _ in range(count)])
        stream_map = torch.zeros_like(ids)
        stream_map[positions] = owners
        return stream_map

    def slot_count(self, stream: str) -> int:
        return int((self.stream_map == 1 + STREAMS.index(stream)).sum())

    # ----- the answer ---------------------------------------------------------------------------

    def _answers(self):
        """The level words' first tokens after the answer prefix, and the score prompt after each level."""
        recipe = self.recipe
        prefix = self._encode(recipe.answer_prefix)
        level_ids, continuations = [], []
        for level in LEVELS:
            answer = recipe.answer.format(level=level)
            full = self._encode(f"{answer} {recipe.score_prompt}" if recipe.score_prompt else answer)
            if full[:len(prefix)] != prefix or len(full) == len(prefix):
                raise RecipeError(f"the tokenizer does not continue {recipe.answer_prefix!r} with {level!r} cleanly")
            level_ids.append(full[len(prefix)])
            continuations.append(full[len(prefix):])
        if len(set(level_ids)) != len(LEVELS):
            raise RecipeError(f"level words share a first token in this tokenizer: {dict(zip(LEVELS, level_ids))}")
        if not recipe.score_prompt:
            if recipe.chat_template == "internlm2-chat":
                # FineVQ reads hidden_states[:, -4] of the teacher-forced "... <level>.<|im_end|>": the token
                # before the level word only while the level word, the answer's rest and <|im_end|> are 3 tokens.
                lengths = {level: len(self._encode(recipe.answer.format(level=level) + IM_END)) - len(prefix)
                           for level in LEVELS}
                if set(lengths.values()) != {3}:
                    raise RecipeError(f"recipe {recipe.name!r} reads the score at the token before the level word "
                                      f"(FineVQ's index -4), which needs '<level>.{IM_END}' to be 3 tokens; this "
                                      f"tokenizer gives {lengths}")
            return torch.tensor(level_ids), None
        lengths = {level: len(c) for level, c in zip(LEVELS, continuations)}
        if len(set(lengths.values())) != 1:
            # A batch continues every video by the same number of tokens after its level word.
            raise RecipeError(f"recipe {recipe.name!r}: '<level> {recipe.score_prompt}' has a different token count per "
                              f"level in this tokenizer ({lengths}); the score prompt needs equal lengths")
        return torch.tensor(level_ids), torch.tensor(continuations)
