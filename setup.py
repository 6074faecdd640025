"""Packaging for slmops_nb: every field comes from settings.ini (nbdev 2 layout, no pkg_resources)."""
from configparser import ConfigParser

import setuptools

config = ConfigParser(delimiters=["="])
config.read("settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]

licenses = {"apache2": ("Apache Software License 2.0", "OSI Approved :: Apache Software License")}
statuses = ["1 - Planning", "2 - Pre-Alpha", "3 - Alpha", "4 - Beta", "5 - Production/Stable"]
lic = licenses[cfg["license"]]

def requirements(key: str) -> list[str]:
    "The requirement lines of a settings.ini key (comment lines skipped)."
    return [r.strip() for r in cfg.get(key, "").splitlines() if r.strip() and not r.strip().startswith("#")]

extras = {name: requirements(f"{name}_requirements") for name in ("olive", "deploy", "llama", "real", "serve", "workbook")}
extras["all"] = sorted({r for reqs in extras.values() for r in reqs})
extras["dev"] = extras["all"] + requirements("dev_requirements")  # the README's commands install this one: everything

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"],
    url=cfg["git_url"],
    license=lic[0],
    keywords=cfg["keywords"].split(),
    classifiers=[
        "Development Status :: " + statuses[int(cfg["status"]) - 1],
        "Intended Audience :: " + cfg["audience"],
        "License :: " + lic[1],
        "Natural Language :: " + cfg["language"],
        "Programming Language :: Python :: 3",
    ],
    packages=setuptools.find_packages(include=[cfg["lib_name"], cfg["lib_name"] + ".*"]),
    package_data={cfg["lib_name"]: ["data/*.jsonl"]},
    include_package_data=True,
    python_requires=">=" + cfg["min_python"],
    install_requires=requirements("requirements"),
    extras_require=extras,
    entry_points={
        "console_scripts": cfg["console_scripts"].split(),
        "nbdev": [f'{cfg["lib_path"]}={cfg["lib_path"]}._modidx:d'],
    },
    zip_safe=False,
)
