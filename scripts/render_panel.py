"""Render the module panel (Resources/UI/SSAMSegment.ui) to docs/panel.png without Slicer, for the README and the
extension's screenshot. Slicer's own widgets (CTK, MRML) are drawn by their closest Qt stand-ins: a group box for a
collapsible section, a combo box for a node selector, a line edit for a path; the values shown are examples.

    python -m venv /tmp/qt && /tmp/qt/bin/pip install PySide6-Essentials
    QT_QPA_PLATFORM=offscreen /tmp/qt/bin/python scripts/render_panel.py docs/panel.png

PySide6 is not a dependency of SSAM Segment (Slicer brings its own Qt); only this script needs it.
"""

import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from PySide6 import QtCore, QtWidgets
from PySide6.QtUiTools import QUiLoader

UI = Path(__file__).resolve().parents[1] / "Resources" / "UI" / "SSAMSegment.ui"
STAND_INS = {"ctkCollapsibleButton": "QGroupBox", "ctkPathLineEdit": "QLineEdit", "qMRMLNodeComboBox": "QComboBox",
             "qMRMLSegmentSelectorWidget": "QComboBox", "qMRMLWidget": "QWidget"}


def plain_qt_ui(path: Path):
    """The .ui with Slicer's classes replaced by their stand-ins and the connections (Slicer signals) left out, and
    each node selector's text for 'none' (what Slicer shows while no node is chosen)."""
    root = ElementTree.parse(path).getroot()
    none_display = {}
    for tag in ("customwidgets", "connections"):
        for element in root.findall(tag):
            root.remove(element)
    for widget in root.iter("widget"):
        original = widget.get("class")
        widget.set("class", STAND_INS.get(original, original))
        for prop in widget.findall("property"):
            if original == "ctkCollapsibleButton" and prop.get("name") == "text":  # the group box's title
                prop.set("name", "title")
            if prop.get("name") == "noneDisplay":
                none_display[widget.get("name")] = prop.findtext("string")
    return ElementTree.tostring(root), none_display


def fill(panel, none_display):
    """Example values: a CT being segmented, a fine-tuning run two validations in."""
    find = lambda kind, name: panel.findChild(kind, name)  # noqa: E731
    find(QtWidgets.QComboBox, "inputVolumeSelector").addItem("CTChest")
    find(QtWidgets.QLineEdit, "labelsLineEdit").setText("liver, spleen")
    find(QtWidgets.QComboBox, "modelComboBox").addItem("Default (LiteMedSAM, offline)")
    find(QtWidgets.QComboBox, "outputSegmentationSelector").addItem("Create new segmentation")
    find(QtWidgets.QPushButton, "applyButton").setText("Cancel")
    find(QtWidgets.QPushButton, "applyButton").setEnabled(True)
    progress = find(QtWidgets.QProgressBar, "progressBar")
    progress.setValue(42)
    progress.setFormat("Segmenting %p%")
    find(QtWidgets.QLabel, "statusLabel").setText("Segmenting: slice 55/130")
    find(QtWidgets.QComboBox, "refineSegmentSelector").addItem("liver")
    for name in ("refineRoiSelector", "refinePointsSelector", "refineNegativePointsSelector"):
        find(QtWidgets.QComboBox, name).addItem(none_display.get(name) or "None")
    find(QtWidgets.QRadioButton, "trainingFolderRadioButton").setChecked(True)
    find(QtWidgets.QLineEdit, "trainingFolderPathLineEdit").setText("/data/my-liver-ct")
    pairs = find(QtWidgets.QListWidget, "trainingPairsListWidget")
    item = QtWidgets.QListWidgetItem("CTChest + CTChest segmentation (liver)")
    item.setCheckState(QtCore.Qt.Checked)
    pairs.addItem(item)
    pairs.setFixedHeight(50)
    find(QtWidgets.QDoubleSpinBox, "trainingBudgetSpinBox").setValue(30)
    find(QtWidgets.QCheckBox, "trainingStartFromDefaultCheckBox").setChecked(True)
    find(QtWidgets.QLineEdit, "trainingAdapterNameLineEdit").setText("my-liver-ct")
    find(QtWidgets.QPushButton, "trainButton").setText("Cancel training")
    find(QtWidgets.QPushButton, "trainButton").setEnabled(True)
    training = find(QtWidgets.QProgressBar, "trainingProgressBar")
    training.setRange(0, 96)
    training.setValue(24)
    training.setFormat("Training: step %v of %m")  # as SSAMSegmentWidget.showTrainingProgress sets it
    table = find(QtWidgets.QTableWidget, "trainingTableWidget")
    table.setHorizontalHeaderLabels(["Step", "Loss", "Val. Dice", "Expected finish"])  # as the widget sets them
    table.horizontalHeader().setSectionResizeMode(QtWidgets.QHeaderView.Stretch)
    for row in (["10/96", "0.7021", "0.612", "14:35"], ["20/96", "0.5874", "0.701", "14:34"]):
        table.insertRow(table.rowCount())
        for column, text in enumerate(row):
            table.setItem(table.rowCount() - 1, column, QtWidgets.QTableWidgetItem(text))
    table.setFixedHeight(110)
    find(QtWidgets.QLabel, "trainingStatusLabel").setText(
        "step 24/96, lr 9.4e-04, loss 0.5369, val Dice 0.701, ends about 14:34 (about 21 min left)")
    settings = find(QtWidgets.QGroupBox, "settingsCollapsibleButton")
    settings.setTitle(settings.title() + " (collapsed)")
    for child in settings.findChildren(QtWidgets.QWidget):
        child.hide()


def main():
    output = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/panel.png")
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    buffer = QtCore.QBuffer()
    text, none_display = plain_qt_ui(UI)
    buffer.setData(QtCore.QByteArray(text))
    buffer.open(QtCore.QIODevice.ReadOnly)
    panel = QUiLoader().load(buffer)
    if panel is None:
        raise SystemExit(f"error: Qt could not load {UI}")
    fill(panel, none_display)
    frame = QtWidgets.QWidget()
    layout = QtWidgets.QVBoxLayout(frame)
    title = QtWidgets.QLabel(f"SSAM Segment (module panel, rendered from {UI.relative_to(UI.parents[2])})")
    title.setStyleSheet("font-weight: bold")
    layout.addWidget(title)
    layout.addWidget(panel)
    frame.resize(560, frame.sizeHint().height())
    frame.show()
    app.processEvents()
    if not frame.grab().save(str(output)):
        raise SystemExit(f"error: could not write {output}")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
