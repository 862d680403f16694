"""YAML from users, bounded before it is expanded: configs and catalogs (issue 24 item 7).

A YAML document is a graph: an alias (``*a``) points back at an anchored node, so a 515-byte file
of nine anchors, each a list of aliases of the one before, stands for hundreds of millions of
nodes. Every reader that turns YAML into plain Python (`persona_core.run.yaml_lines`,
`persona_core.catalog.project_format`) composes the node graph first (cheap: the file's size),
then calls `check_nodes`, which counts the nodes the document expands to without expanding it
(each node is counted once, memoised) and refuses:

* aliases that add more than `MAX_ALIAS_NODES` nodes to what the text spells out (a few
  anchors reused a few times pass; a bomb does not),
* an alias inside its own anchor (a recursive document: it would never finish expanding),
* nesting deeper than `MAX_DEPTH` (Python's recursion limit, in the composer or the reader).

Lives in the store layer, beside the id grammar, so both the catalog and the config readers can
use it.
"""

from __future__ import annotations

import yaml

MAX_ALIAS_NODES = 10_000  # nodes aliases may add beyond those the text spells out
MAX_DEPTH = 200  # nested collections (well below Python's recursion limit)


class YamlBoundsError(ValueError):
    """A YAML document over a bound; `line` (1-based, or None) says where."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


def compose(text: str, loader_cls: type = yaml.SafeLoader) -> tuple[yaml.Node | None, yaml.BaseLoader]:
    """(the document's node graph, the loader holding it) with the bounds checked; YAMLError as PyYAML raises it.

    Construct plain Python with ``loader.construct_document(node)`` (and ``loader.dispose()`` after).
    """
    loader = loader_cls(text)
    try:
        node = loader.get_single_node()
    except RecursionError:
        loader.dispose()
        raise YamlBoundsError(f"nested too deeply (at most {MAX_DEPTH} levels)") from None
    if node is not None:
        check_nodes(node)
    return node, loader


def check_nodes(root: yaml.Node) -> None:
    """Refuse a node graph that expands too far, refers to itself, or nests too deeply (see module doc)."""
    bound = _distinct_nodes(root) + MAX_ALIAS_NODES
    expanded: dict[int, int] = {}  # node -> the number of nodes it expands to (each node counted once)
    open_: set[int] = set()  # nodes being counted: an alias to one of them is a cycle

    def count(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in expanded:
            return expanded[key]
        line = node.start_mark.line + 1
        if key in open_:
            raise YamlBoundsError("an alias refers to the anchor it is inside (a recursive document)", line)
        if depth > MAX_DEPTH:
            raise YamlBoundsError(f"nested too deeply (at most {MAX_DEPTH} levels)", line)
        total = 1
        if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)):
            open_.add(key)
            for child in _children(node):
                total += count(child, depth + 1)
                if total > bound:
                    raise YamlBoundsError(f"aliases expand the document to more than {MAX_ALIAS_NODES} nodes "
                                          "beyond what it spells out (an alias bomb?); write the values out or "
                                          "use fewer aliases", line)
            open_.discard(key)
        expanded[key] = total
        return total

    count(root, 0)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _distinct_nodes(root: yaml.Node) -> int:
    """How many distinct nodes the graph holds: what the text spells out, each alias target once."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) not in seen:
            seen.add(id(node))
            stack.extend(_children(node))
    return len(seen)
