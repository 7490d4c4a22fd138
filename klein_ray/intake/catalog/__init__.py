"""Catalogs: a products table x scenes x seeds, through sandboxed templates, into a manifest.

``definition`` (the catalog file's model), ``templates`` (Jinja2's sandbox), ``products`` (the
products table, streamed), ``fields`` (rendered values as manifest columns), ``expand`` (the
expander), ``expansion`` (one expand: duplicate ids, publish), ``writer`` (deterministic
manifests, published whole), ``reroll`` (rejected rows again, with new ids and seeds). See
docs/catalog.md.
"""
