"""Small text games for the multi-turn environment interface (pefrl/envs.py).

Both games are played in numbers, since the embedded tiny model writes digits after '=' (it was trained on
'a+b=' -> the sum); a real instruct model plays them as well from the same text.

- `GuessingGame`: the environment hides a number in 1..high and answers each guess with 'higher', 'lower' or
  'correct'. Reward 1.0 when the number is found (at the end), 0 otherwise: the policy must learn to use
  the feedback, a binary search needs ceil(log2(high + 1)) turns. `ShapedGuessingGame` adds a dense
  closeness reward (potential-based shaping), which the tiny model needs to learn at all.
- `TicTacToe`: the policy plays X by naming a cell 1-9, the environment plays O (a seeded random legal move).
  Reward at the end: 1 win, 0.5 draw, 0 loss; an illegal or unreadable move forfeits (0).

    env:
      name: pefrl.tasks.games:ShapedGuessingGame
      max_turns: 5
"""

from __future__ import annotations

import random
import re

_INTEGER = re.compile(r"-?\d+")


def first_integer(text: str) -> int | None:
    """The first integer in `text` ('12', ' 7 apples', '-3'), or None."""
    match = _INTEGER.search(text)
    return int(match.group()) if match else None


class GuessingGame:
    """Guess the hidden number in 1..high. Observations tell the direction; the episode ends when it is found."""

    high: int = 20
    """Largest hidden number (a class attribute so a subclass can change it: `class Guess100(GuessingGame)`)."""
    shaping: float = 0.0
    """Weight of the closeness reward: each guess earns shaping * (phi(guess) - phi(previous guess)) with the
    potential phi = -min(|guess - secret|, high) / high (-1 before the first guess or for no number). It is
    potential-based (Ng, Harada & Russell 1999) and phi is 0 at the secret, so over an episode it sums to
    shaping * (1 - final distance / high): found -> shaping + 1.0 in all."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        self.secret = 0
        self.guesses: list[int | None] = []

    def reset(self) -> str:
        self.secret = self.rng.randint(1, self.high)
        self.guesses = []
        return f"guess 1-{self.high}="

    def step(self, text: str) -> tuple[str, float, bool]:
        guess = first_integer(text)
        previous = self.guesses[-1] if self.guesses else None
        self.guesses.append(guess)
        bonus = self.shaping * (self.potential(guess) - self.potential(previous))
        if guess == self.secret:
            return "correct", 1.0 + bonus, True
        if guess is None:
            hint = "number"
        else:
            hint = "higher" if self.secret > guess else "lower"
        return f" {hint}=", bonus, False  # ends in '=' like the prompt: the cue to write a number

    def potential(self, guess: int | None) -> float:
        if guess is None:
            return -1.0
        return -min(abs(guess - self.secret), self.high) / self.high


class ShapedGuessingGame(GuessingGame):
    """`GuessingGame` with the closeness reward at weight 0.5: a dense signal the embedded tiny model learns from
    (found: 1.5 in all; never found: up to 0.5 for ending close)."""

    shaping = 0.5


class TicTacToe:
    """Tic-tac-toe as X against a random O. The board is 9 characters (rows top to bottom), cells numbered 1-9."""

    LINES = ((0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6))

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        self.board = ["."] * 9

    def reset(self) -> str:
        self.board = ["."] * 9
        return f"{''.join(self.board)} move="

    def step(self, text: str) -> tuple[str, float, bool]:
        move = first_integer(text)
        if move is None or not 1 <= move <= 9 or self.board[move - 1] != ".":
            return "illegal", 0.0, True
        self.board[move - 1] = "X"
        if self.winner() == "X":
            return "win", 1.0, True
        free = [i for i, c in enumerate(self.board) if c == "."]
        if not free:
            return "draw", 0.5, True
        self.board[self.rng.choice(free)] = "O"
        if self.winner() == "O":
            return "loss", 0.0, True
        if "." not in self.board:
            return "draw", 0.5, True
        return f" {''.join(self.board)} move=", 0.0, False

    def winner(self) -> str | None:
        for a, b, c in self.LINES:
            if self.board[a] != "." and self.board[a] == self.board[b] == self.board[c]:
                return self.board[a]
        return None
