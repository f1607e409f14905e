"""Realistic PHI for the synthetic cohort: names, dates, addresses, institutions, and the DICOM
modules that carry them where real exports do (free text, nested sequences, a vendor private block).

Every value is drawn from the generator the caller passes, so a patient's identity is reproducible;
the de-identification tests and the leak gate look for exactly these values in the output.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

FIRST_NAMES = [
    "JANE",
    "JOHN",
    "MARIA",
    "AHMED",
    "WEI",
    "OLGA",
    "PIERRE",
    "AMARA",
    "LUCA",
    "SOFIA",
    "KENJI",
    "FATIMA",
    "DAVID",
    "INGRID",
    "CARLOS",
    "NADIA",
]


LAST_NAMES = [
    "DOE",
    "SMITH",
    "GARCIA",
    "MULLER",
    "NGUYEN",
    "KOWALSKI",
    "ROSSI",
    "OKAFOR",
    "JOHANSSON",
    "DUBOIS",
    "TANAKA",
    "HADDAD",
    "OBRIEN",
    "SILVA",
    "PETROV",
    "LARSEN",
]


STREETS = ["Elm Street", "Harbour Road", "Rue des Lilas", "Kastanienallee", "Via Roma", "Main St"]


CITIES = ["Springfield", "Lyon", "Leipzig", "Bologna", "Bergen", "Porto"]


INSTITUTIONS = [
    "St. Mary's General Hospital",
    "Universitaetsklinikum Nord",
    "Clinique du Parc",
    "Riverside Medical Center",
]


def _date(rng: np.random.Generator, start: dt.date, span_days: int) -> dt.date:
    return start + dt.timedelta(days=int(rng.integers(0, span_days)))


def make_phi(rng: np.random.Generator, index: int) -> dict:
    """A realistic, fictitious identity and visit for patient ``index``."""
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    birth = _date(rng, dt.date(1940, 1, 1), 365 * 40)
    study = _date(rng, dt.date(2019, 1, 1), 365 * 5)
    study_time = dt.time(
        int(rng.integers(7, 19)), int(rng.integers(0, 60)), int(rng.integers(0, 60))
    )
    age = study.year - birth.year - ((study.month, study.day) < (birth.month, birth.day))
    return {
        "PatientName": f"{last}^{first}",
        "PatientID": f"MRN{int(rng.integers(10**6, 10**7))}{index:03d}",
        "PatientBirthDate": birth.strftime("%Y%m%d"),
        "PatientSex": str(rng.choice(["F", "M"])),
        "PatientAge": f"{age:03d}Y",
        "PatientWeight": f"{rng.uniform(50, 110):.1f}",
        "PatientSize": f"{rng.uniform(1.5, 1.95):.2f}",
        "PatientAddress": f"{int(rng.integers(1, 200))} {rng.choice(STREETS)}, {rng.choice(CITIES)}",
        "InstitutionName": str(rng.choice(INSTITUTIONS)),
        "InstitutionAddress": f"{int(rng.integers(1, 99))} Hospital Way, {rng.choice(CITIES)}",
        "ReferringPhysicianName": f"{rng.choice(LAST_NAMES)}^{rng.choice(FIRST_NAMES)}^^Dr",
        "PerformingPhysicianName": f"{rng.choice(LAST_NAMES)}^{rng.choice(FIRST_NAMES)}",
        "OperatorsName": f"{rng.choice(LAST_NAMES)}^{rng.choice(FIRST_NAMES)}",
        "AccessionNumber": f"ACC{int(rng.integers(10**7, 10**8))}",
        "StudyDate": study.strftime("%Y%m%d"),
        "StudyTime": study_time.strftime("%H%M%S"),
        "StudyID": f"{int(rng.integers(1000, 9999))}",
        "DeviceSerialNumber": f"SN{int(rng.integers(10**5, 10**6))}",
        "StationName": f"CTROOM{int(rng.integers(1, 9))}",
        "first": first,
        "last": last,
    }


def phi_dataset(phi: dict, uids: dict) -> Dataset:
    """The patient / study / equipment modules, with PHI where real exports put it."""
    ds = Dataset()
    for key in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "PatientAge",
        "PatientWeight",
        "PatientSize",
        "PatientAddress",
        "InstitutionName",
        "InstitutionAddress",
        "ReferringPhysicianName",
        "PerformingPhysicianName",
        "OperatorsName",
        "AccessionNumber",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "DeviceSerialNumber",
        "StationName",
    ):
        setattr(ds, key, phi[key])
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = phi["StudyDate"]
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = phi["StudyTime"]
    ds.StudyDescription = f"CT CHEST LOW DOSE - {phi['first'].title()} {phi['last'].title()}"
    ds.SeriesDescription = "Lung 1.0 B60f"
    ds.ImageComments = f"Follow-up for {phi['last']}, {phi['first']} (MRN {phi['PatientID']})"
    ds.AdditionalPatientHistory = f"Smoker. Patient {phi['first']} {phi['last']} referred by GP."
    ds.Manufacturer, ds.ManufacturerModelName = "SYNTHETIC", "ctpipe-phantom"
    ds.SoftwareVersions = "ctpipe-synth 1"
    ds.OtherPatientIDsSequence = Sequence([Dataset()])
    ds.OtherPatientIDsSequence[0].PatientID = phi["PatientID"].replace("MRN", "INS")
    ds.OtherPatientIDsSequence[0].IssuerOfPatientID = phi["InstitutionName"]
    ds.OtherPatientIDsSequence[0].TypeOfPatientID = "TEXT"  # Type 1 in this sequence
    request = Dataset()
    request.RequestedProcedureID = phi["AccessionNumber"]
    request.ScheduledProcedureStepID = phi["StudyID"]
    request.RequestedProcedureDescription = f"CT thorax for {phi['last']}^{phi['first']}"
    request.ReferencedStudySequence = Sequence([Dataset()])
    request.ReferencedStudySequence[0].ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    request.ReferencedStudySequence[0].ReferencedSOPInstanceUID = uids["study"]
    request.ScheduledPerformingPhysicianName = phi["PerformingPhysicianName"]
    ds.RequestAttributesSequence = Sequence([request])
    # Vendor private block, as Siemens/GE exports carry: creator + values that repeat the identity.
    block = ds.private_block(0x0029, "CTPIPE_VENDOR_1", create=True)
    block.add_new(0x10, "LO", f"{phi['last']}^{phi['first']}")
    block.add_new(0x11, "LO", phi["PatientID"])
    block.add_new(0x12, "DS", "1.0")
    return ds
