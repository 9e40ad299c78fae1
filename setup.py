"""Metadata lives in setup.cfg; this file only installs fvq_plugin-discovery.pth into site-packages.

The .pth file lets pyiqa and lmms-eval find the plugin without `import fvq_plugin`
(fvq_plugin/integrations/discovery.py says why). A wheel puts it next to the packages; an
editable install (`pip install -e .`) assembles its wheel from install_lib, so it goes there.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "fvq_plugin-discovery.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        target = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.copy_file(PTH, str(Path(target, PTH)))

    def get_outputs(self, include_bytecode=1):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, PTH))]


setup(cmdclass={"build_py": BuildPyWithPth})
