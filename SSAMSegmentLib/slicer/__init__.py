"""Slicer glue: MRML scene nodes <-> SimpleITK images, and the background process with progress and cancel.

Imported by the Slicer module only; `import slicer` inside it is the application's package."""
