// Python binding of ExpertBank (expert_bank.h).
#include <torch/csrc/utils/pybind.h>

#include "expert_bank.h"

void bind_expert_bank(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<ExpertBank>(m, "ExpertBank", py::module_local())
      .def(py::init<int64_t, int64_t>())
      .def("add", &ExpertBank::add)
      .def("forward", &ExpertBank::forward, py::call_guard<py::gil_scoped_release>(),
           "one token through its chosen experts: x [1, E], chosen, weights [k] -> [1, E]");
}
