"""Package set-up read from nbdev's settings.ini (the nbdev 2 convention)."""
from configparser import ConfigParser
import setuptools

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini', encoding='utf-8')
c = cfg['DEFAULT']
req = c.get('requirements', '').split()
dev = c.get('dev_requirements', '').split()
scripts = c.get('console_scripts', '').split()

setuptools.setup(
    name=c['lib_name'], version=c['version'], description=c['description'],
    author=c['author'], license='Apache-2.0', python_requires=f">={c['min_python']}",
    packages=setuptools.find_packages(include=['turbotalk', 'turbotalk.*']),
    install_requires=req, extras_require={'dev': dev},
    entry_points={'console_scripts': scripts, 'nbdev': [f"{c['lib_path']}={c['lib_path']}._modidx:d"]},
    zip_safe=False)
