"""3D Slicer glue without Qt: volume nodes to SimpleITK images, masks to segments, scene pairs to training cases.

Works with the MRML classes of a running Slicer and with those of slicer-core (PyPI, no Qt, no `slicer.app`), which
is how it is tested. Geometry facts it relies on:
- A volume node's voxel array is (k, j, i) [+ components]; its IJK-to-RAS matrix holds spacing, directions and
  origin in RAS. SimpleITK images (and files) are LPS: x and y change sign.
- Segments are written on the input volume's own voxel grid (the volume's IJK-to-RAS matrix, exactly), in the
  segmentation node's coordinate system: when the segmentation sits under another linear transform than the volume,
  the grid is mapped through the transform between the two.
- Writing never leaves a half-filled segmentation: every mask is converted first, then all segments are added, and
  if anything fails the segments added so far are removed again.

`slicer` and `vtk` are imported inside the functions, so importing this module needs neither.
"""

import collections
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import SSAMError
from ..files.image_io import check_image, same_geometry

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
_SEGMENTATIONS_LOGIC = []  # headless slicer-core: one module logic kept alive (it registers the labelmap converters)


def ensure_segmentation_support(scene) -> None:
    """Make segment operations work on `scene` outside the Slicer application.

    In Slicer the Segmentations module has registered the representation converters at start-up. In slicer-core
    nothing has, and `AddEmptySegment` then silently returns '' ; a vtkSlicerSegmentationsModuleLogic given the
    scene (with an application logic) registers them.
    """
    import slicer

    if getattr(slicer, "app", None) is not None:
        return
    if any(logic.GetMRMLScene() is scene for logic in _SEGMENTATIONS_LOGIC):
        return
    application_logic = slicer.vtkSlicerApplicationLogic()
    application_logic.SetMRMLScene(scene)
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    logic.SetMRMLApplicationLogic(application_logic)
    _SEGMENTATIONS_LOGIC.append(logic)
    _SEGMENTATIONS_LOGIC.append(application_logic)


# ---------------------------------------------------------------------------------------------------------------
# Volumes


def ijk_to_ras(volume_node) -> np.ndarray:
    """The volume's 4x4 IJK-to-RAS matrix (its own, without parent transforms)."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def volume_grid(volume_node) -> tuple:
    """(dimensions, IJK-to-RAS matrix) of a volume: equal before and after means the voxel grid did not change."""
    image_data = volume_node.GetImageData()
    dims = tuple(image_data.GetDimensions()) if image_data is not None else None
    return dims, tuple(ijk_to_ras(volume_node).reshape(-1).tolist())


def volume_array(volume_node) -> np.ndarray:
    """The voxels as a numpy view (k, j, i) or (k, j, i, components); SSAMError when the node has none."""
    from vtk.util import numpy_support

    image_data = volume_node.GetImageData() if volume_node is not None else None
    if image_data is None or image_data.GetPointData() is None or image_data.GetPointData().GetScalars() is None:
        name = volume_node.GetName() if volume_node is not None else "(none)"
        raise SSAMError(f"volume '{name}' has no voxels; load an image into it or pick another volume")
    dims = image_data.GetDimensions()
    scalars = image_data.GetPointData().GetScalars()
    components = scalars.GetNumberOfComponents()
    shape = tuple(reversed(dims)) + ((components,) if components > 1 else ())
    return numpy_support.vtk_to_numpy(scalars).reshape(shape)


def image_from_volume_node(volume_node) -> sitk.Image:
    """A checked SimpleITK image (LPS) with the volume's voxels and geometry.

    A volume with a single slice (k = 1: a photo, an endoscopy frame, one microscopy field) becomes a 2D image, as
    the same picture read from a file would be; `write_segments` puts its 2D masks back on the one-slice grid.
    """
    array = volume_array(volume_node)
    matrix = ijk_to_ras(volume_node)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise SSAMError(f"volume '{volume_node.GetName()}' has a zero voxel spacing; fix its geometry in the Volumes module")
    direction_lps = LPS_FROM_RAS @ (matrix[:3, :3] / spacing[None, :])
    origin_lps = LPS_FROM_RAS @ matrix[:3, 3]
    rgb = array.ndim == 4
    if array.shape[0] == 1:  # one slice: a 2D picture
        image = sitk.GetImageFromArray(np.ascontiguousarray(array[0]), isVector=rgb)
        image.SetSpacing([float(spacing[0]), float(spacing[1])])
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=rgb)
        image.SetSpacing([float(v) for v in spacing])
        image.SetOrigin([float(v) for v in origin_lps])
        image.SetDirection([float(v) for v in direction_lps.reshape(-1)])
    return check_image(image, f"volume '{volume_node.GetName()}'")


def _mask_on_volume_grid(name: str, mask: sitk.Image, volume_node, image: Optional[sitk.Image]) -> np.ndarray:
    """The mask's voxels as uint8 0/1 (k, j, i) on the volume's grid; SSAMError when it is on another grid."""
    dims = volume_node.GetImageData().GetDimensions()
    expected = tuple(reversed(dims))
    array = sitk.GetArrayViewFromImage(mask)
    if array.ndim == 2:
        array = array[None]
    if tuple(array.shape) != expected or (image is not None and not same_geometry(mask, image)):
        raise SSAMError(
            f"mask of '{name}' (size {mask.GetSize()}) is not on the grid of volume '{volume_node.GetName()}' "
            f"(dimensions {tuple(dims)}); segment this volume again"
        )
    return (array != 0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Segmentation nodes


def _segment_names(segmentation) -> List[Tuple[str, str]]:
    return [(segmentation.GetNthSegmentID(n), segmentation.GetNthSegment(n).GetName())
            for n in range(segmentation.GetNumberOfSegments())]


def find_segment(segmentation, name: str) -> Optional[str]:
    """ID of the segment whose name is `name` up to case, spaces and underscores; None when there is none."""
    from ..model.labels import label_key

    for segment_id, segment_name in _segment_names(segmentation):
        if label_key(segment_name) == label_key(name):
            return segment_id
    return None


def unique_segment_name(name: str, taken: Sequence[str]) -> str:
    """`name` when free, else 'name 2', 'name 3'... (never overwrites an existing segment)."""
    from ..model.labels import label_key

    keys = {label_key(t) for t in taken}
    if label_key(name) not in keys:
        return name
    number = 2
    while label_key(f"{name} {number}") in keys:
        number += 1
    return f"{name} {number}"


def new_segmentation_node(volume_node, name: Optional[str] = None):
    """A new segmentation node for `volume_node`: reference geometry, display, transform and subject hierarchy."""
    scene = volume_node.GetScene()
    if scene is None:
        raise SSAMError(f"volume '{volume_node.GetName()}' is not in a scene")
    base = name or f"{volume_node.GetName()} segmentation"
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(base))
    node.CreateDefaultDisplayNodes()
    prepare_segmentation_node(node, volume_node)
    return node


def prepare_segmentation_node(segmentation_node, volume_node) -> None:
    """Reference geometry = the volume; same parent transform and subject-hierarchy folder as the volume.

    The transform and hierarchy are only set on a segmentation that holds no segments yet: a segmentation the user
    already filled keeps its place (its segments then receive masks mapped through the transform between them).
    """
    ensure_segmentation_support(segmentation_node.GetScene())
    empty = segmentation_node.GetSegmentation().GetNumberOfSegments() == 0
    if empty and segmentation_node.GetTransformNodeID() != volume_node.GetTransformNodeID():
        segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    if empty:
        place_next_to(segmentation_node, volume_node)


def place_next_to(node, volume_node) -> None:
    """Put `node` in the same subject-hierarchy folder (study, patient...) as `volume_node`."""
    import slicer

    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(volume_node.GetScene())
    if hierarchy is None:
        return
    volume_item = hierarchy.GetItemByDataNode(volume_node)
    if not volume_item:
        return
    parent = hierarchy.GetItemParent(volume_item)
    node_item = hierarchy.GetItemByDataNode(node)
    if node_item:
        hierarchy.SetItemParent(node_item, parent)
    else:  # outside the Slicer application no plugin creates items for new nodes
        hierarchy.CreateItem(parent, node)


def _volume_to_segmentation_matrix(volume_node, segmentation_node) -> np.ndarray:
    """4x4 from the volume's coordinates to the segmentation's; SSAMError for a non-linear transform between them."""
    import slicer
    import vtk

    source = volume_node.GetParentTransformNode()
    target = segmentation_node.GetParentTransformNode()
    if source is target:
        return np.eye(4)
    matrix = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(source, target, matrix):
        raise SSAMError(
            f"volume '{volume_node.GetName()}' and segmentation '{segmentation_node.GetName()}' are under different "
            f"non-linear transforms; choose 'Create new segmentation' or harden the transforms first"
        )
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _oriented_image(mask_kji: np.ndarray, image_to_world: np.ndarray):
    import slicer
    import vtk
    from vtk.util import numpy_support

    k, j, i = mask_kji.shape
    oriented = slicer.vtkOrientedImageData()
    oriented.SetDimensions(i, j, k)
    oriented.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(oriented.GetPointData().GetScalars())[:] = mask_kji.reshape(-1)
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(image_to_world[r, c]))
    oriented.SetImageToWorldMatrix(matrix)
    return oriented


def write_segments(masks: "collections.OrderedDict[str, sitk.Image]", segmentation_node, volume_node,
                   replace_existing: bool = False, image: Optional[sitk.Image] = None,
                   colors: Optional[Dict[str, Tuple[float, float, float]]] = None) -> "collections.OrderedDict[str, str]":
    """Add one segment per mask (named after its label) to `segmentation_node`; return label -> segment ID.

    An existing segment with the same name is never overwritten unless `replace_existing`: the new one is named
    'liver 2'. Replacing keeps the old segment's colour and position. `image` is the image the masks were computed
    from (to check the grid); `colors` overrides the default distinct colours. All or nothing: on any failure the
    segmentation is left as it was.
    """
    import slicer

    if not masks:
        raise SSAMError("no label masks to write")
    ensure_segmentation_support(segmentation_node.GetScene())
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetNumberOfSegments() == 0 or not segmentation_node.GetNodeReference(
            slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()):
        prepare_segmentation_node(segmentation_node, volume_node)
    image_to_world = _volume_to_segmentation_matrix(volume_node, segmentation_node) @ ijk_to_ras(volume_node)

    # 1. Everything that can fail on bad input, before the segmentation is touched.
    arrays = collections.OrderedDict(
        (label, _mask_on_volume_grid(label, mask, volume_node, image)) for label, mask in masks.items())
    existing = _segment_names(segmentation)
    plan = []  # (label, final name, id of the segment it replaces or None)
    taken = [name for _, name in existing]
    for label in arrays:
        replaced = find_segment(segmentation, label) if replace_existing else None
        if replaced is not None and replaced in [p[2] for p in plan]:
            replaced = None  # two labels matching one segment: the second becomes a new segment
        name = segmentation.GetSegment(replaced).GetName() if replaced else unique_segment_name(label, taken)
        taken.append(name)
        plan.append((label, name, replaced))
    if colors is None:
        from ..files.seg_nrrd import segment_colors

        all_colors = segment_colors([name for _, name in existing] + [name for _, name, _ in plan])
        colors = {label: all_colors[name] for label, name, _ in plan}
    oriented = {label: _oriented_image(array, image_to_world) for label, array in arrays.items()}

    # 2. Add the new segments; roll back on failure.
    added = collections.OrderedDict()
    was_modifying = segmentation_node.StartModify()
    try:
        for label, name, replaced in plan:
            color = segmentation.GetSegment(replaced).GetColor() if replaced else colors[label]
            segment_id = segmentation.AddEmptySegment("", name if not replaced else f"{name} (new)", list(color))
            if not segment_id:
                raise SSAMError(f"could not add segment '{name}' to '{segmentation_node.GetName()}'")
            added[label] = segment_id
            if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
                    oriented[label], segmentation_node, segment_id,
                    slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE):
                raise SSAMError(f"could not write the mask of '{label}' into '{segmentation_node.GetName()}'")
        # 3. Only now retire the segments being replaced: the new one takes their name and place.
        for label, name, replaced in plan:
            if replaced:
                index = segmentation.GetSegmentIndex(replaced)
                segmentation.RemoveSegment(replaced)
                segmentation.GetSegment(added[label]).SetName(name)
                segmentation.SetSegmentIndex(added[label], index)
    except BaseException:
        for segment_id in added.values():
            if segmentation.GetSegment(segment_id) is not None:
                segmentation.RemoveSegment(segment_id)
        raise
    finally:
        segmentation_node.EndModify(was_modifying)
    return added


# ---------------------------------------------------------------------------------------------------------------
# Reading segments back (training from the scene)


def segment_masks(segmentation_node, volume_node, segment_ids: Optional[Sequence[str]] = None
                  ) -> "collections.OrderedDict[str, sitk.Image]":
    """Segment name -> uint8 0/1 mask on the volume's grid, with the geometry of `image_from_volume_node(volume)`.

    Segments stored on another grid or under another linear transform are resampled (nearest neighbour) onto the
    volume's grid.
    """
    import slicer
    import vtk

    ensure_segmentation_support(segmentation_node.GetScene())
    segmentation = segmentation_node.GetSegmentation()
    ids = list(segment_ids) if segment_ids is not None else [sid for sid, _ in _segment_names(segmentation)]
    reference_image = image_from_volume_node(volume_node)
    dims = volume_node.GetImageData().GetDimensions()
    reference = slicer.vtkOrientedImageData()
    reference.SetDimensions(*dims)
    segmentation_to_volume = np.linalg.inv(_volume_to_segmentation_matrix(volume_node, segmentation_node))
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(ijk_to_ras(volume_node)[r, c]))
    reference.SetImageToWorldMatrix(matrix)
    transform = vtk.vtkTransform()
    transform.SetMatrix([float(v) for v in segmentation_to_volume.reshape(-1)])

    masks = collections.OrderedDict()
    for segment_id in ids:
        segment = segmentation.GetSegment(segment_id)
        if segment is None:
            raise SSAMError(f"segmentation '{segmentation_node.GetName()}' has no segment '{segment_id}'")
        labelmap = slicer.vtkOrientedImageData()
        if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
                segmentation_node, segment_id, labelmap, False):
            raise SSAMError(f"segment '{segment.GetName()}' has no binary labelmap; convert it in the Segmentations module")
        resampled = slicer.vtkOrientedImageData()
        if labelmap.IsEmpty():
            array = np.zeros(tuple(reversed(dims)), dtype=np.uint8)
        else:
            slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
                labelmap, reference, resampled, False, False, transform, 0)
            # The representation of a segment in a shared layer is the whole layer: keep this segment's value only.
            array = (_extent_array(resampled, dims) == segment.GetLabelValue()).astype(np.uint8)
        mask = sitk.GetImageFromArray(array[0] if reference_image.GetDimension() == 2 else array)
        mask.CopyInformation(reference_image)
        masks[segment.GetName()] = mask
    return masks


def _extent_array(oriented, dims) -> np.ndarray:
    """The voxels of `oriented` placed into a full (k, j, i) array of the reference dimensions (zeros outside)."""
    from vtk.util import numpy_support

    full = np.zeros(tuple(reversed(dims)), dtype=np.uint8)
    extent = oriented.GetExtent()
    if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
        return full
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    values = numpy_support.vtk_to_numpy(oriented.GetPointData().GetScalars()).reshape(shape)
    lo = [max(0, extent[2 * a]) for a in range(3)]
    hi = [min(dims[a] - 1, extent[2 * a + 1]) for a in range(3)]
    if any(h < l for l, h in zip(lo, hi)):
        return full
    full[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1] = values[
        lo[2] - extent[4]:hi[2] - extent[4] + 1, lo[1] - extent[2]:hi[1] - extent[2] + 1, lo[0] - extent[0]:hi[0] - extent[0] + 1]
    return full


def reference_volume(segmentation_node):
    """The volume a segmentation was drawn on (its reference geometry volume), or None."""
    import slicer

    return segmentation_node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())


def scene_training_pairs(scene) -> List[Tuple[object, object]]:
    """(volume node, segmentation node) for every segmentation with segments and a reference volume with voxels."""
    pairs = []
    for n in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        segmentation_node = scene.GetNthNodeByClass(n, "vtkMRMLSegmentationNode")
        volume_node = reference_volume(segmentation_node)
        if (volume_node is None or volume_node.GetImageData() is None
                or segmentation_node.GetSegmentation().GetNumberOfSegments() == 0):
            continue
        pairs.append((volume_node, segmentation_node))
    return pairs


def training_case(volume_node, segmentation_node, labels: Optional[Sequence[str]] = None):
    """One training case `(case_id, image, OrderedDict[name, mask])` from a volume and its segmentation.

    With `labels`, only segments with those names (matched like labels: case and '_' insensitive) are used.
    """
    from ..model.labels import label_key

    names = _segment_names(segmentation_node.GetSegmentation())
    if labels:
        wanted = {label_key(label) for label in labels}
        names = [(sid, name) for sid, name in names if label_key(name) in wanted]
    masks = segment_masks(segmentation_node, volume_node, [sid for sid, _ in names])
    case_id = f"{volume_node.GetName()}|{segmentation_node.GetName()}"
    return case_id, image_from_volume_node(volume_node), masks
