"""vlpt's built-in objectives, installed as the package ``vlpt_objectives``.

Each file is one objective and the template for your own: it registers itself
with ``@register_objective`` and is advertised in vlpt's ``pyproject.toml``
through the ``vlpt.objectives`` entry-point group, exactly like a plugin.
"""
