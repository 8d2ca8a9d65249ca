"""Architectures: encodings round-trip, validation gives clear errors, values are immutable."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from nas.space import PRIMITIVES, Architecture, parse_arch


def _random_arch(seed: int, nodes: int = 5) -> Architecture:
    rng = random.Random(seed)

    def cell() -> tuple:
        return tuple(
            (rng.randrange(i + 2), rng.randrange(5), rng.randrange(i + 2), rng.randrange(5))
            for i in range(nodes)
        )

    return Architecture(cell(), cell())


ARCH = Architecture.from_flat([0, 0, 1, 4, 2, 2, 0, 3] + [1, 1, 0, 4, 2, 0, 2, 3])


@pytest.mark.parametrize("seed", range(5))
def test_encodings_round_trip(seed):
    arch = _random_arch(seed)
    # flat list, string and JSON all give back the same value
    assert Architecture.from_flat(arch.to_flat()) == arch
    assert Architecture.from_string(str(arch)) == arch
    assert Architecture.from_json(arch.to_json()) == arch
    assert parse_arch(str(arch.to_flat())) == arch


def test_string_form_is_readable():
    # the format: (op, input) pairs, nodes separated by |, normal then reduce
    assert str(ARCH) == (
        "normal: [(sep_conv_3x3, 0), (identity, 1) | (avg_pool_3x3, 2), (max_pool_3x3, 0)] "
        "reduce: [(sep_conv_5x5, 1), (identity, 0) | (sep_conv_3x3, 2), (max_pool_3x3, 2)]"
    )
    assert ARCH.to_flat() == [0, 0, 1, 4, 2, 2, 0, 3, 1, 1, 0, 4, 2, 0, 2, 3]


def test_json_stores_names_and_primitives():
    data = json.loads(ARCH.to_json(valid_acc=0.5))
    assert data["primitives"] == list(PRIMITIVES)
    assert data["normal"][0] == [["sep_conv_3x3", 0], ["identity", 1]]
    assert data["valid_acc"] == 0.5 and data["string"] == str(ARCH)


def test_json_matches_ops_by_name_when_primitives_grow():
    # a file from an older PRIMITIVES order is read by name, not by index
    data = ARCH.to_dict()
    grown = ("new_op",) + PRIMITIVES
    arch = Architecture.from_dict(data, grown)
    assert str(arch) == str(ARCH) and arch.to_flat() != ARCH.to_flat()


def test_loose_ends_and_edges():
    # normal: node 2 is used by node 3, so only node 3 is concatenated
    assert ARCH.loose_ends(False) == [3]
    assert ARCH.edges(False)[1] == (2, 1, "identity")


@pytest.mark.parametrize(
    "flat, message",
    [
        ([0, 0, 2, 0] * 2, "node 2: input 2 is invalid"),
        ([0, 5, 1, 0] * 2, "op index 5 is invalid"),
        ([0, -1, 1, 0] * 2, "op index -1 is invalid"),
        ([0, 0, 1], "8 integers per node"),
    ],
)
def test_invalid_values_are_refused_with_clear_messages(flat, message):
    with pytest.raises(ValueError, match=message):
        Architecture.from_flat(flat)


def test_cells_must_have_the_same_size():
    with pytest.raises(ValueError, match="same number of nodes"):
        Architecture(((0, 0, 1, 0),), ((0, 0, 1, 0), (0, 0, 1, 0)))


def test_unknown_op_name_in_string():
    with pytest.raises(ValueError, match="unknown op 'conv_7x7'"):
        Architecture.from_string("normal: [(conv_7x7, 0), (identity, 1)] "
                                 "reduce: [(identity, 0), (identity, 1)]")


def test_architecture_is_immutable_and_hashable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ARCH.normal = ()  # type: ignore[misc]
    assert len({ARCH, Architecture.from_flat(ARCH.to_flat())}) == 1


def test_parse_arch_reads_files_and_explains_bad_ones(tmp_path):
    good = tmp_path / "best_arch.json"
    good.write_text(ARCH.to_json())
    assert parse_arch(str(good)) == ARCH
    with pytest.raises(ValueError, match="file not found"):
        parse_arch(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_arch(str(bad))
