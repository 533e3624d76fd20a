"""Version of kiv."""
__version__ = '0.1.0'


def parse_version_info(version_str: str) -> tuple:
    """Parse a version string into a tuple such as ``(0, 1, 0)``.

    Args:
        version_str (str): e.g. ``'0.1.0'`` or ``'0.1.0rc1'``.

    Returns:
        tuple: integers, then a pre-release string if present.
    """
    info = []
    for part in version_str.split('.'):
        if part.isdigit():
            info.append(int(part))
        elif 'rc' in part:
            major, rc = part.split('rc')
            info.extend([int(major), f'rc{rc}'])
    return tuple(info)


version_info = parse_version_info(__version__)
