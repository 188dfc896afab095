"""dsckpt.printable.listed: the first few of many, and how many more."""

from __future__ import annotations

from dsckpt.printable import listed


def test_a_short_list_is_shown_whole() -> None:
    assert listed([]) == ""
    assert listed(["a"]) == "a"
    assert listed("abc") == "a, b, c"


def test_a_long_list_says_how_many_are_left_out() -> None:
    assert listed("abcde") == "a, b, c and 2 more"
    assert listed(range(12), 10) == "0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 2 more"
    assert listed("abcde", 2, sep="; ", more="; and {} more") == "a; b; and 3 more"
    assert (
        listed(["x failed", "y failed"], 1, more=" (and {} more{x})") == "x failed (and 1 more{x})"
    )


def test_only_the_shown_items_are_made_text() -> None:
    seen: list[int] = []

    def name(rank: int) -> str:
        seen.append(rank)
        return f"rank_{rank}.pt"

    assert listed(range(1_000_000), each=name) == "rank_0.pt, rank_1.pt, rank_2.pt and 999997 more"
    assert seen == [0, 1, 2]
