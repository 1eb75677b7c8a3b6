"""Data: image readers, sources and manifests, the phantom chest X-ray set, transforms, the torch dataset.

Submodules are imported where used (``from evidrift.data.readers import read_image``), so importing
``evidrift.data`` stays cheap.
"""
