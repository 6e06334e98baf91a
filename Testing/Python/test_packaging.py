"""The Slicer extension as packaged: CMake file lists against the files on disk, an installed copy that imports,
the panel's widget names against the code, and the extension metadata (CMakeLists, s4ext, ExtensionsIndex JSON)."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ElementTree
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
MODULE_CMAKE = REPO / "SSAMSegment" / "CMakeLists.txt"
TOP_CMAKE = REPO / "CMakeLists.txt"
UI_FILE = REPO / "Resources" / "UI" / "SSAMSegment.ui"
MODULE_FILE = REPO / "SSAMSegment" / "SSAMSegment.py"


# --- CMake lists ------------------------------------------------------------------------------------------------


def cmake_sets(path: Path) -> dict:
    """`set(NAME value...)` commands of a CMakeLists (quoted values kept whole), ${NAME} references expanded."""
    text = re.sub(r"(?m)#[^\n\"]*$", "", path.read_text())
    variables = {}
    for match in re.finditer(r"\bset\(", text):
        tokens, position = [], match.end()
        token = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\)|[^\s)"]+)')
        while True:
            found = token.match(text, position)
            position = found.end()
            if found.group(1) == ")":
                break
            tokens.append(found.group(1))
        name, values = tokens[0], [v[1:-1] if v.startswith('"') else v for v in tokens[1:]]
        variables[name] = [re.sub(r"\$\{(\w+)\}", lambda m: " ".join(variables.get(m.group(1), [])), v)
                           for v in values]
    return variables


def files_under(root: Path, folder: str, suffix: str = "") -> set:
    """Files under root/folder (relative to root), without caches and hidden files."""
    found = set()
    for path in (root / folder).rglob("*"):
        relative = path.relative_to(root)
        if (path.is_file() and path.name.endswith(suffix) and "__pycache__" not in relative.parts
                and not any(part.startswith(".") for part in relative.parts) and not path.name.endswith(".pyc")):
            found.add(relative.as_posix())
    return found


def packaging_problems(root: Path) -> list:
    """Every difference between the module CMakeLists' lists and the files on disk under `root`."""
    sets = cmake_sets(root / "SSAMSegment" / "CMakeLists.txt")
    problems = []
    expected = {
        "MODULE_PYTHON_SCRIPTS": {p.split("/", 1)[1] for p in files_under(root, "SSAMSegment", ".py")},
        "LIBRARY_PYTHON_SCRIPTS": files_under(root, "SSAMSegmentLib", ".py"),
        "LIBRARY_PYTHON_RESOURCES": files_under(root, "Resources") | {"pyproject.toml"},
    }
    for variable, on_disk in expected.items():
        listed = sets.get(variable, [])
        if len(listed) != len(set(listed)):
            problems.append(f"{variable} lists a file twice")
        for name in sorted(on_disk - set(listed)):
            problems.append(f"{name} is not listed in {variable}: it would be missing from the extension")
        for name in sorted(set(listed) - on_disk):
            problems.append(f"{name} is listed in {variable} but does not exist: CMake would fail")
    return problems


def test_cmake_lists_every_module_library_and_resource_file():
    assert packaging_problems(REPO) == []


def test_an_unlisted_file_is_caught(tmp_path):
    """The check above can fail: a copy of the tree with one more library file and one more resource."""
    for folder in ("SSAMSegment", "SSAMSegmentLib", "Resources"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    assert packaging_problems(tmp_path) == []
    (tmp_path / "SSAMSegmentLib" / "new_feature.py").write_text("")
    (tmp_path / "Resources" / "Models").mkdir(exist_ok=True)
    (tmp_path / "Resources" / "Models" / "extra.adapter.safetensors").write_bytes(b"")
    (tmp_path / "SSAMSegment" / "SSAMSegmentHelper.py").write_text("")
    problems = packaging_problems(tmp_path)
    assert any(p.startswith("SSAMSegmentLib/new_feature.py is not listed") for p in problems)
    assert any(p.startswith("Resources/Models/extra.adapter.safetensors is not listed") for p in problems)
    assert any(p.startswith("SSAMSegmentHelper.py is not listed") for p in problems)
    (tmp_path / "SSAMSegmentLib" / "model" / "weights.py").unlink()
    assert any(p.startswith("SSAMSegmentLib/model/weights.py is listed") for p in packaging_problems(tmp_path))


def test_module_cmake_installs_library_and_resources_next_to_the_module():
    text = MODULE_CMAKE.read_text()
    module_call = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text, re.S).group(1)
    assert "NAME ${MODULE_NAME}" in module_call and "SCRIPTS ${MODULE_PYTHON_SCRIPTS}" in module_call
    library_call = re.search(r"ctkMacroCompilePythonScript\((.*?)\n\s*\)", text, re.S).group(1)
    for fragment in ("SCRIPTS ${LIBRARY_PYTHON_SCRIPTS}", "RESOURCES ${LIBRARY_PYTHON_RESOURCES}",
                     "SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR}/..",
                     "DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}",
                     "INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}", "NO_INSTALL_SUBDIR"):
        assert fragment in library_call, fragment
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert cmake_sets(MODULE_CMAKE)["MODULE_NAME"] == ["SSAMSegment"]


def installed_copy(destination: Path) -> Path:
    """What ctkMacroCompilePythonScript and slicerMacroBuildScriptedModule put in qt-scripted-modules."""
    sets = cmake_sets(MODULE_CMAKE)
    for name in sets["MODULE_PYTHON_SCRIPTS"]:
        (destination / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "SSAMSegment" / name, destination / name)
    for name in sets["LIBRARY_PYTHON_SCRIPTS"] + sets["LIBRARY_PYTHON_RESOURCES"]:
        (destination / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, destination / name)
    return destination


def test_installed_extension_is_complete_and_finds_its_resources(tmp_path):
    """Only the listed files, in the installed layout: every library module imports, resources are found there."""
    installed = installed_copy(tmp_path / "qt-scripted-modules")
    modules = [".".join(Path(name).with_suffix("").parts) for name in cmake_sets(MODULE_CMAKE)["LIBRARY_PYTHON_SCRIPTS"]
               if not name.endswith("__init__.py")]
    assert "SSAMSegmentLib.model.weights" in modules
    check = textwrap.dedent(f"""
        import importlib, sys
        from pathlib import Path
        installed = Path({str(installed)!r})
        sys.path = [str(installed)] + [p for p in sys.path if p not in ("", {str(REPO)!r}, {str(REPO / "SSAMSegment")!r})]
        import SSAMSegmentLib
        assert Path(SSAMSegmentLib.__file__).parent == installed / "SSAMSegmentLib", SSAMSegmentLib.__file__
        for name in {modules!r}:
            importlib.import_module(name)
        from SSAMSegmentLib.model import loading
        assert loading.RESOURCES == installed / "Resources", loading.RESOURCES
        sys.path.insert(0, str(installed))
        import SSAMSegment
        assert SSAMSegment._shippedFile("Resources/UI/SSAMSegment.ui") == installed / "Resources/UI/SSAMSegment.ui"
        assert SSAMSegment._shippedFile("Resources/Icons/SSAMSegment.png").is_file()
        torch, other = SSAMSegment.SSAMSegmentLogic.pythonRequirements()
        assert torch and other
        import SSAMSegmentBatch
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=str(tmp_path), env=env,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr


def test_module_loads_before_pytorch_is_installed(tmp_path):
    """Slicer loads the module at start-up, before the user agreed to install PyTorch: it must not import it."""
    check = textwrap.dedent(f"""
        import sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "torchvision", "safetensors", "segment_anything"):
                    raise ModuleNotFoundError(f"No module named {{name!r}}")
                return None
        sys.meta_path.insert(0, NoTorch())
        sys.path.insert(0, {str(REPO / "SSAMSegment")!r})
        import SSAMSegment
        logic = SSAMSegment.SSAMSegmentLogic()
        torch, other = logic.pythonRequirements()
        assert logic.torchVersionRequirement(torch) == ">=2.1"
        assert logic.parseLabels("liver, spleen") == ["liver", "spleen"]
        # What the panel shows at start-up still works: the user's adapter files, named from the file name.
        adapter = {str(tmp_path / "my-liver.adapter.safetensors")!r}
        open(adapter, "wb").close()
        assert [str(p) for p in logic.adapterChoices([adapter, adapter + ".gone"])] == [adapter]
        assert logic.adapterTitle(adapter) == "my-liver"
        # The library's light parts (weights cache, adapter metadata) work before PyTorch too.
        assert logic.cacheFolder().name
        assert "torch" not in sys.modules
        try:
            import torch  # noqa: F401
        except ImportError:
            pass
        else:
            raise AssertionError("the test's import block is not working")
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


# --- the panel: .ui widgets against the code ----------------------------------------------------------------------


def ui_widgets():
    """name -> (class, SlicerParameterName or None) for every widget of the .ui file."""
    root = ElementTree.parse(UI_FILE).getroot()
    widgets = {}
    for widget in root.iter("widget"):
        parameter = None
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                parameter = prop.find("string").text
        widgets[widget.get("name")] = (widget.get("class"), parameter)
    return widgets


def module_tree():
    return ast.parse(MODULE_FILE.read_text())


def ui_names_used_by_code():
    return set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))


def parameter_node_fields():
    for node in module_tree().body:
        if isinstance(node, ast.ClassDef) and node.name == "SSAMSegmentParameterNode":
            return {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    raise AssertionError("SSAMSegmentParameterNode not found")


CONTROLS = {"QPushButton", "QToolButton", "QComboBox", "QLineEdit", "QCheckBox", "QRadioButton", "QSpinBox",
            "QDoubleSpinBox", "qMRMLNodeComboBox", "ctkPathLineEdit", "QListWidget", "QTableWidget", "QProgressBar"}


def test_every_widget_the_code_uses_is_in_the_ui():
    widgets = ui_widgets()
    missing = sorted(ui_names_used_by_code() - set(widgets))
    assert missing == [], f"self.ui.<name> without a widget of that name in {UI_FILE.name}: {missing}"


def test_every_control_in_the_ui_is_used_by_the_code():
    used = ui_names_used_by_code()
    unused = sorted(name for name, (cls, parameter) in ui_widgets().items()
                    if cls in CONTROLS and name not in used and parameter is None)
    assert unused == [], f"controls in {UI_FILE.name} that nothing reads or connects: {unused}"


def test_parameter_names_match_the_parameter_node_both_ways():
    parameters = {parameter for _cls, parameter in ui_widgets().values() if parameter}
    fields = parameter_node_fields()
    assert parameters - fields == set(), "SlicerParameterName without a parameter node field"
    assert fields - parameters == set(), "parameter node field without a widget"
    names = [parameter for _cls, parameter in ui_widgets().values() if parameter]
    assert len(names) == len(set(names)), "two widgets bound to one parameter"


def test_ui_file_is_a_slicer_module_panel():
    root = ElementTree.parse(UI_FILE).getroot()
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "SSAMSegment"
    declared = {c.find("class").text for c in root.iter("customwidget")}
    used = {cls for cls, _parameter in ui_widgets().values()}
    assert {cls for cls in used if cls.startswith(("q", "ctk"))} <= declared
    receivers = {c.find("receiver").text for c in root.iter("connection")
                 if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"}
    node_combos = {name for name, (cls, _p) in ui_widgets().items()
                   if cls in ("qMRMLNodeComboBox", "qMRMLSegmentSelectorWidget")}
    assert receivers == node_combos, "every node selector must receive the scene"
    selector = next(w for w in root.iter("widget") if w.get("name") == "inputVolumeSelector")
    types = [s.text for p in selector.findall("property") if p.get("name") == "nodeTypes" for s in p.iter("string")]
    assert types == ["vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode"]


def test_module_file_holds_only_module_widget_logic_and_test():
    classes = [node.name for node in module_tree().body if isinstance(node, ast.ClassDef)]
    assert classes == ["SSAMSegment", "SSAMSegmentParameterNode", "SSAMSegmentWidget", "SSAMSegmentLogic",
                       "SSAMSegmentTest"]


def test_logic_and_slicer_glue_have_no_qt():
    logic = next(node for node in module_tree().body if isinstance(node, ast.ClassDef) and node.name == "SSAMSegmentLogic")
    names = {node.id for node in ast.walk(logic) if isinstance(node, ast.Name)}
    attributes = {ast.unparse(node) for node in ast.walk(logic) if isinstance(node, ast.Attribute)}
    assert not names & {"qt", "ctk"}
    assert not {a for a in attributes if a.startswith(("slicer.app", "slicer.mrmlScene", "slicer.modules", "slicer.util"))}
    for library_file in ("slicer/scene_nodes.py", "slicer/background_task.py"):
        source = (REPO / "SSAMSegmentLib" / library_file).read_text()
        assert not re.search(r"^\s*(import|from)\s+(qt|ctk|PythonQt)\b", source, re.M), library_file
        assert "slicer.app." not in source and "slicer.mrmlScene" not in source, library_file


# --- extension metadata -------------------------------------------------------------------------------------------


def extension_settings():
    return {name: values for name, values in cmake_sets(TOP_CMAKE).items() if name.startswith("EXTENSION_")}


def s4ext_fields():
    fields = {}
    for line in (REPO / "SSAMSegment.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
    return fields


def test_top_level_cmake_has_the_extension_metadata():
    settings = extension_settings()
    for name in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                 "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert settings.get(name) and all(settings[name]), name
    assert settings["EXTENSION_CATEGORY"] == ["Segmentation"]
    assert settings["EXTENSION_DEPENDS"] == ["PyTorch"]
    text = TOP_CMAKE.read_text()
    for line in ("project(SSAMSegment)", "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                 "add_subdirectory(SSAMSegment)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                 "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text, line
    # The icon and screenshot URLs name files of this repository.
    for url in settings["EXTENSION_ICONURL"] + settings["EXTENSION_SCREENSHOTURLS"]:
        assert url.startswith(settings["EXTENSION_HOMEPAGE"][0].replace("github.com", "raw.githubusercontent.com"))
        assert (REPO / url.split("/main/", 1)[1]).is_file(), url


def test_s4ext_matches_the_cmake_metadata():
    fields = s4ext_fields()
    settings = extension_settings()
    for key in ("scm", "scmurl", "scmrevision", "depends", "homepage", "contributors", "category", "iconurl",
                "status", "description", "screenshoturls", "enabled"):
        assert fields.get(key), key
    assert fields["scm"] == "git"
    assert "PyTorch" in fields["depends"].split()
    assert fields["homepage"] == settings["EXTENSION_HOMEPAGE"][0]
    assert fields["scmurl"] == settings["EXTENSION_HOMEPAGE"][0] + ".git"
    assert fields["category"] == settings["EXTENSION_CATEGORY"][0]
    assert fields["contributors"] == settings["EXTENSION_CONTRIBUTORS"][0]
    assert fields["description"] == settings["EXTENSION_DESCRIPTION"][0]
    assert fields["iconurl"] == settings["EXTENSION_ICONURL"][0]
    assert fields["screenshoturls"].split() == settings["EXTENSION_SCREENSHOTURLS"]


# Slicer's ExtensionsIndex catalog entry schema v1.0.2 (Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json):
# these keys only ("additionalProperties": false); homepage, description, icon... come from the CMakeLists.
CATALOG_KEYS = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                "dicom_support_rule", "build_subdirectory", "enabled", "tier"}
CATALOG_REQUIRED = {"$schema", "category", "scm_url"}


def test_extensions_index_entry_follows_the_catalog_schema():
    entry = json.loads((REPO / "SSAMSegment.json").read_text())
    assert set(entry) <= CATALOG_KEYS and CATALOG_REQUIRED <= set(entry)
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert entry["category"] == extension_settings()["EXTENSION_CATEGORY"][0]
    assert entry["scm_url"] == s4ext_fields()["scmurl"]
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry.get("scm_type", "git") == "git" and 1 <= entry.get("tier", 1) <= 5


def test_icon_license_and_pyproject():
    from PIL import Image

    with Image.open(REPO / "Resources" / "Icons" / "SSAMSegment.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)
    license_text = (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert 'license = "Apache-2.0"' in (REPO / "pyproject.toml").read_text()
