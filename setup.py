from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
about: dict = {}
exec((HERE / "django_brex_oauth" / "__about__.py").read_text(), about)

setup(
    name="django-brex-oauth",
    version=about["__version__"],
    description=(
        "Connect your Django site's users to their Brex accounts: OpenID Connect, "
        "encrypted tokens, background refresh, revocation, admin and signals."
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["django_brex_oauth", "django_brex_oauth.*"]),
    include_package_data=True,
    zip_safe=False,
    python_requires=">=3.10",
    install_requires=[
        "Django>=5.2",
        "requests>=2.31",
        "requests-oauthlib>=2.0",
        "PyJWT[crypto]>=2.8",
        "django-cryptography-5>=2.0.3",
        "celery>=5.4",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-django>=4.9",
            "django-environ>=0.11",
            "psycopg[binary]>=3.1",
            "redis>=5",
            "playwright>=1.45",
        ],
        # pytest: the reference documents the pytest plugin, which autodoc imports.
        "docs": ["sphinx>=8.1", "furo>=2024.8.6", "pytest>=8"],
        "example": ["django-environ>=0.11"],
        "postgres": ["psycopg[binary]>=3.1"],
        "redis": ["celery[redis]>=5.4"],
    },
    classifiers=[
        "Framework :: Django",
        "Framework :: Django :: 5.2",
        "Framework :: Django :: 6.0",
        "Framework :: Django :: 6.1",
        "Intended Audience :: Developers",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Topic :: Internet :: WWW/HTTP",
    ],
)
