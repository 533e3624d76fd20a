"""Install kiv. Requirements are read from ``requirements/*.txt``."""
import os.path as osp
import re

from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))


def readme() -> str:
    with open(osp.join(HERE, 'README.md'), encoding='utf-8') as f:
        return f.read()


def get_version() -> str:
    with open(osp.join(HERE, 'kiv', 'version.py'), encoding='utf-8') as f:
        match = re.search(r"^__version__ = '([^']+)'", f.read(), re.M)
    assert match, 'kiv/version.py must define __version__'
    return match.group(1)


def parse_requirements(fname: str) -> list:
    """Read one requirements file, following ``-r`` includes.

    Args:
        fname (str): path relative to the repository root.

    Returns:
        list[str]: requirement specifiers, comments and blanks removed.
    """
    reqs = []
    with open(osp.join(HERE, fname), encoding='utf-8') as f:
        for line in f:
            line = line.split('#', 1)[0].strip()
            if not line:
                continue
            if line.startswith('-r '):
                inc = osp.join(osp.dirname(fname), line[3:].strip())
                reqs.extend(parse_requirements(inc))
            else:
                reqs.append(line)
    return reqs


setup(
    name='kiv',
    version=get_version(),
    description='Knowledge Inheritance for Vision: model-driven vision '
    'foundation models on OpenMMLab',
    long_description=readme(),
    long_description_content_type='text/markdown',
    keywords='knowledge distillation, vision foundation model, openmmlab',
    # projects/ (the demo) sits beside the library and is not installed
    packages=find_packages(
        exclude=('configs', 'tools', 'tests', 'projects', 'projects.*')),
    include_package_data=True,
    python_requires='>=3.9',
    license='Apache License 2.0',
    install_requires=parse_requirements('requirements/runtime.txt'),
    extras_require={
        'all': parse_requirements('requirements.txt'),
        'tests': parse_requirements('requirements/tests.txt'),
        'optional': parse_requirements('requirements/optional.txt'),
        'mim': parse_requirements('requirements/mminstall.txt'),
    },
    zip_safe=False)
